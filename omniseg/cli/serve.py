"""``omniseg serve``: the web service and page, on loopback unless told otherwise."""

from __future__ import annotations

import argparse
import socket
import sys

from omniseg.errors import ModelNotFoundError, OmnisegError

DESCRIPTION = "Serve an HTTP API (POST /v1/segment, GET /v1/models, GET /healthz) and a page at /."
EPILOG = """\
Each --model is loaded once and shared by all requests; a request picks one by name (the
string given here; 'default' for the bundled model when no --model is given), else the
first. Inference runs on --workers threads; up to --queue-size more requests wait, and
further ones are answered 503 at once. The API is described at /docs once running.
Binds to 127.0.0.1 unless --host says otherwise (0.0.0.0 exposes it to the network).

exit status: 0 stopped cleanly, 2 usage error (bad arguments, the address cannot be
listened on, a model cannot be loaded, the serve extra is missing).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from omniseg.cli import argtypes

    parser = subparsers.add_parser(
        "serve",
        help="run the web service and page",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", action="append", default=[], metavar="M",
                        help="model directory or hub id; repeat to serve several "
                             "(default: the bundled model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=argtypes.integer(minimum=1, maximum=65535), default=8000,
                        help="port to listen on (default: 8000)")
    parser.add_argument("--max-upload-mb", type=argtypes.number(above=0), default=20.0, metavar="MB",
                        help="largest accepted image file, in MiB (default: 20)")
    parser.add_argument("--max-megapixels", type=argtypes.number(above=0), default=40.0, metavar="MP",
                        help="largest accepted image, in millions of pixels, checked before "
                             "decoding (default: 40)")
    parser.add_argument("--workers", type=argtypes.integer(minimum=1), default=1, metavar="N",
                        help="inference threads (default: 1)")
    parser.add_argument("--queue-size", type=argtypes.integer(minimum=0), default=8, metavar="N",
                        help="requests that may wait for a worker before 503 (default: 8)")
    parser.add_argument("--device", type=argtypes.device, default="cpu", metavar="{cpu,cuda}",
                        help="where the models run: cpu, cuda or cuda:N (default: cpu)")
    parser.set_defaults(_serve_parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from omniseg.serve import ModelRegistry, create_app
    except ImportError as exc:
        return _usage_error(args, f"the serve extra is not installed ({exc.name} missing): "
                                  "pip install 'omniseg[serve]'")
    # Checked before the models load (seconds to minutes): a port already in use used to
    # be found only after them, once the URL had been announced, with uvicorn's exit 3.
    problem = _bind_problem(args.host, args.port)
    if problem is not None:
        return _usage_error(args, f"cannot listen on {_url_host(args.host)}:{args.port}: {problem}")
    try:
        registry = ModelRegistry.load(
            args.model, device=args.device, max_pixels=round(args.max_megapixels * 1_000_000)
        )
    except ModelNotFoundError as exc:
        return _usage_error(args, f"--model: {exc}")
    except (OmnisegError, OSError, ValueError) as exc:
        return _usage_error(args, f"cannot load the model: {exc}")
    app = create_app(
        registry,
        workers=args.workers,
        queue_size=args.queue_size,
        max_upload_bytes=round(args.max_upload_mb * 1024 * 1024),
    )
    names = ", ".join(model.name for model in registry)
    print(f"omniseg serve: models {names}; http://{_url_host(args.host)}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound (in use, no such address), or ``None``. The socket
    is closed again at once, with ``SO_REUSEADDR`` set as uvicorn sets it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _usage_error(args: argparse.Namespace, message: str) -> int:
    parser = args._serve_parser
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2

