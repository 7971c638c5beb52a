"""The web service's HTTP API with FastAPI's TestClient: every route, every error status,
a concurrent burst, the busy answer, and a decompression bomb against a memory bound."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reference_models import build_reference_mask2former

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="python-multipart (serve extra) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

import omniseg.serve.app  # noqa: E402
from omniseg.cli.main import main  # noqa: E402
from omniseg.io.results import decode_rle  # noqa: E402
from omniseg.serve import ModelRegistry, create_app  # noqa: E402
from omniseg.serve.pool import InferencePool  # noqa: E402
from omniseg.serve.registry import ServedModel  # noqa: E402

MAX_PIXELS = 4_000_000


pytestmark = pytest.mark.usefixtures("single_thread_per_test")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_reference_mask2former(tmp_path_factory.mktemp("serve-models") / "tiny-m2f")


@pytest.fixture(scope="module")
def registry(model_dir) -> ModelRegistry:
    """The tiny model (first, so the default) and the bundled default model."""
    return ModelRegistry(
        [
            ServedModel(name="tiny", pipeline=_pipeline(model_dir)),
            ServedModel(name="default", pipeline=_pipeline(None)),
        ]
    )


def _pipeline(model):
    import omniseg

    return omniseg.pipeline("image-segmentation", model=model, max_pixels=MAX_PIXELS)


@pytest.fixture
def client(registry):
    app = create_app(registry, workers=2, queue_size=8, max_upload_bytes=1_000_000)
    with TestClient(app) as test_client:
        yield test_client


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(camvid_dir) -> list[tuple[str, bytes]]:
    """Four real street crops of different sizes, PNG-encoded, with names."""
    paths = sorted((camvid_dir / "images" / "val").glob("*.png"))[:4]
    boxes = [(0, 0, 160, 120), (40, 30, 161, 163), (100, 50, 244, 146), (200, 100, 296, 172)]
    return [
        (f"crop{i}.png", _png(Image.open(path).convert("RGB").crop(box)))
        for i, (path, box) in enumerate(zip(paths, boxes))
    ]


def _post(client, data: bytes, name: str = "street.png", **fields):
    return client.post("/v1/segment", files={"image": (name, data, "image/png")},
                       data={k: str(v) for k, v in fields.items()})


# --- routes ------------------------------------------------------------------------------


def test_health_models_openapi_and_page(client, model_dir):
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "models": ["tiny", "default"], "workers": 2,
                             "capacity": 10, "in_use": 0}

    models = client.get("/v1/models").json()
    assert models["default"] == "tiny"
    tiny, bundled = models["models"]
    assert tiny["name"] == "tiny" and tiny["tasks"] == ["panoptic", "instance", "semantic"]
    assert tiny["labels"] == {str(i): f"label_{i}" for i in range(5)}
    assert bundled["labels"]["0"] == "sky" and bundled["colors"]["0"] == [230, 25, 75]

    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"/healthz", "/v1/models"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200

    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/app.css"):
        assert asset in page.text
        assert client.get(asset).status_code == 200


def test_segment_answers_equal_omniseg_segment_files(client, model_dir, photos, tmp_path):
    """json, png and overlay answers are the bytes that ``omniseg segment`` writes."""
    name, data = photos[1]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / name), "--out", str(out), "--model", str(model_dir),
                 "--task", "instance", "--threshold", "0"]) == 0
    written = json.loads((out / "crop1.json").read_text())

    answer = _post(client, data, name, task="instance", threshold=0)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert 'filename="crop1.json"' in answer.headers["content-disposition"]
    document = answer.json()
    assert document["segments"] == written["segments"] and len(document["segments"]) >= 2
    assert (document["image"], document["task"], document["model"]) == (name, "instance", "tiny")
    assert (document["width"], document["height"]) == (121, 133)
    mask = decode_rle(document["segments"][0]["segmentation"])
    assert mask.shape == (133, 121) and mask.sum() == document["segments"][0]["area"]

    labels = _post(client, data, name, task="instance", threshold=0, format="png")
    assert labels.headers["content-type"] == "image/png"
    assert labels.content == (out / "crop1_labels.png").read_bytes()
    overlay = _post(client, data, name, task="instance", threshold=0, format="overlay")
    assert overlay.content == (out / "crop1_overlay.png").read_bytes()

    coco = _post(client, data, name, task="instance", threshold=0, format="coco").json()
    assert [a["segmentation"] for a in coco["annotations"]] == [s["segmentation"] for s in written["segments"]]
    assert coco["images"] == [{"id": 1, "file_name": name, "width": 121, "height": 133}]


def test_json_base64_body_and_model_choice(client, photos):
    name, data = photos[0]
    multipart = _post(client, data, name, task="panoptic", threshold=0.2).json()
    encoded = base64.b64encode(data).decode()
    plain = client.post("/v1/segment", json={"image": encoded, "filename": name, "task": "panoptic",
                                             "threshold": 0.2})
    data_url = client.post("/v1/segment", json={"image": "data:image/png;base64," + encoded,
                                                "filename": name, "task": "panoptic", "threshold": "0.2"})
    assert plain.status_code == data_url.status_code == 200
    assert plain.json() == data_url.json() == multipart

    bundled = _post(client, data, name, model="default", task="semantic").json()
    assert bundled["model"] == "default" and bundled["task"] == "semantic"
    assert {s["label"] for s in bundled["segments"]} >= {"sky", "road"}  # a street scene
    assert all(s["score"] is None for s in bundled["segments"])


# --- errors ------------------------------------------------------------------------------


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_REQUESTS = {
    # name: (request keyword arguments, status, error type, words in the message)
    "not an image": (dict(files={"image": ("notes.txt", b"plain text", "text/plain")}),
                     400, "ImageReadError", "notes.txt: not an image"),
    "empty image": (dict(files={"image": ("empty.png", b"", "image/png")}), 400, "BadParameterError", "empty"),
    "no image field": (dict(data={"task": "semantic"}, files={"other": ("a", b"x")}), 400,
                       "BadParameterError", "unknown field"),
    "image as text": (dict(files={"image": (None, b"abc")}), 400, "BadParameterError", "file upload"),
    "bad task": (dict(data={"task": "depth"}), 400, "BadParameterError", "task must be one of"),
    "bad threshold": (dict(data={"threshold": "high"}), 400, "BadParameterError", "threshold"),
    "threshold out of range": (dict(data={"threshold": "1.5"}), 400, "BadParameterError", "between 0 and 1"),
    "threshold NaN": (dict(data={"threshold": "nan"}), 400, "BadParameterError", "between 0 and 1"),
    "bad format": (dict(data={"format": "gif"}), 400, "BadParameterError", "format must be one of"),
    "unknown model": (dict(data={"model": "nope"}), 404, "UnknownModelError", "unknown model 'nope'"),
    "bad JSON": (dict(content=b"{not json", headers={"content-type": "application/json"}), 400,
                 "BadParameterError", "not valid JSON"),
    "JSON not an object": (dict(json=[1, 2]), 400, "BadParameterError", "must be an object"),
    "bad base64": (dict(json={"image": "***"}), 400, "BadParameterError", "not valid base64"),
    "JSON without image": (dict(json={"task": "semantic"}), 400, "BadParameterError", "base64 string"),
    "JSON unknown key": (dict(json={"image": "AAAA", "colour": 1}), 400, "BadParameterError", "colour"),
    "JSON threshold bool": (dict(json={"image": "AAAA", "threshold": True}), 400, "BadParameterError", "threshold"),
    "other content type": (dict(content=b"abc", headers={"content-type": "text/plain"}), 415,
                           "UnsupportedMediaTypeError", "text/plain"),
    "declared too large": (dict(content=b"x" * 1_500_000, headers={"content-type": "application/json"}),
                           413, "PayloadTooLargeError", "(images up to 1000000 bytes, 0.953674 MiB)"),
    "streamed too large": (dict(content=iter([b"x" * 200_000] * 8), headers={"content-type": "application/json"}),
                           413, "PayloadTooLargeError", "exceeds the limit"),
    "image too large in JSON": (dict(json={"image": base64.b64encode(b"\0" * 1_000_001).decode()}),
                                413, "PayloadTooLargeError", "1000001 bytes exceeds"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_their_status_and_a_message(client, photos, case):
    kwargs, status, kind, words = BAD_REQUESTS[case]
    if "files" not in kwargs and "data" in kwargs:
        kwargs = dict(kwargs, files={"image": ("street.png", photos[0][1], "image/png")})
    answer = client.post("/v1/segment", **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == kind
    assert words in answer.json()["message"]
    assert "Traceback" not in answer.text


def test_corrupt_images_and_unknown_routes_then_still_serving(client, photos):
    name, data = photos[0]
    cut = _post(client, _truncated(data), "cut.png")
    assert cut.status_code == 400 and cut.json()["message"].startswith("cut.png: ")
    assert "truncated" in cut.json()["message"]
    assert client.get("/v1/nothing").status_code == 404
    wrong_method = client.get("/v1/segment")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "HTTPError"
    assert _post(client, data, name).status_code == 200


def _png_bomb(width: int, height: int) -> bytes:
    """A valid RGB PNG of zeros: about 0.2 MB on disk, ``3 * width * height`` bytes decoded.
    Written chunk by chunk, so that the test never holds the decoded size itself."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)  # filter byte + pixels
    parts = [compressor.compress(row * 64) for _ in range(height // 64)]
    parts.append(compressor.compress(row * (height % 64)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_decompression_bomb_refused_within_a_memory_bound(client):
    """A 200 MB (8165 x 8165 RGB) bomb is under Pillow's own bomb error (179 M pixels), so the
    service's pixel limit must refuse it from the header, before any pixel is decoded."""
    bomb = _png_bomb(8165, 8165)
    assert len(bomb) < 1_000_000
    before = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS through /proc/self/clear_refs: {exc}")
    answer = _post(client, bomb, "bomb.png")
    growth_mib = (_rss_kib("VmHWM") - before) / 1024
    assert answer.status_code == 400 and answer.json()["error"] == "ImageTooLargeError"
    assert "bomb.png: 8165x8165 = 66667225 pixels exceeds the limit" in answer.json()["message"]
    assert growth_mib < 40, f"peak memory grew by {growth_mib:.0f} MiB"


# --- concurrency -------------------------------------------------------------------------


def test_concurrent_burst_gives_the_sequential_answers(registry, photos):
    app = create_app(registry, workers=4, queue_size=32, max_upload_bytes=1_000_000)
    requests = [(photos[i % 4], ("panoptic", "instance", "semantic", "panoptic")[i % 4 - (i // 4) % 2])
                for i in range(32)]
    with TestClient(app) as client:
        def call(item):
            (name, data), task = item
            answer = _post(client, data, name, task=task, threshold=0)
            return answer.status_code, answer.content

        sequential = {(name, task): call(((name, data), task)) for (name, data), task in set(requests)}
        with ThreadPoolExecutor(max_workers=4) as threads:
            burst = list(threads.map(call, requests))
        assert client.get("/healthz").json()["in_use"] == 0
    assert [status for status, _ in burst] == [200] * 32
    assert all(body == sequential[(name, task)][1] for ((name, _), task), (_, body) in zip(requests, burst))
    assert len({body for _, body in burst}) == len(sequential) >= 6


def test_full_queue_answers_503_at_once_and_frees_the_slot(registry, photos, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_segment = omniseg.serve.app.segment

    def slow_segment(*args):
        started.set()
        assert release.wait(30)
        return real_segment(*args)

    monkeypatch.setattr(omniseg.serve.app, "segment", slow_segment)
    app = create_app(registry, workers=1, queue_size=0, max_upload_bytes=1_000_000)
    name, data = photos[0]
    with TestClient(app) as client, ThreadPoolExecutor(max_workers=1) as threads:
        first = threads.submit(_post, client, data, name)
        assert started.wait(30)
        busy = _post(client, data, name)
        assert busy.status_code == 503 and busy.json()["error"] == "ServiceBusyError"
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["message"]
        assert client.get("/healthz").json()["in_use"] == 1  # light routes still answer
        release.set()
        assert first.result(timeout=60).status_code == 200
        assert _post(client, data, name).status_code == 200


def test_registry_loads_each_model_once(model_dir):
    registry = ModelRegistry.load([str(model_dir), str(model_dir)], max_pixels=MAX_PIXELS)
    assert [model.name for model in registry] == [str(model_dir)]
    assert registry.get(None) is registry.get(str(model_dir))
    assert registry.default.pipeline.max_pixels == MAX_PIXELS
    bundled = ModelRegistry.load([], max_pixels=None)
    assert [model.name for model in bundled] == ["default"]


def test_serve_command_usage_errors(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--port", "70000"])
    assert "between 1 and 65535" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_before_loading_models(capsys, monkeypatch):
    """A port already in use is a usage error (exit 2) naming the address, found before any
    model loads; it used to load them, announce the URL, then end in uvicorn's exit 3."""
    import socket

    loaded = []
    monkeypatch.setattr(ModelRegistry, "load", classmethod(lambda cls, *a, **k: loaded.append(a)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: " in err and "in use" in err
    assert not loaded and "omniseg serve: models" not in err
    assert main(["serve", "--host", "no-such-host.invalid", "--port", str(port)]) == 2
    assert "cannot listen on no-such-host.invalid" in capsys.readouterr().err


def test_a_request_cancelled_mid_job_keeps_its_slot_until_the_job_ends():
    """A client that leaves does not free its slot while its job still runs: otherwise
    jobs could pile up on the pool beyond workers + queue."""
    pool = InferencePool(workers=1, queue_size=0)
    started, release = threading.Event(), threading.Event()

    def job():
        started.set()
        release.wait(30)

    async def scenario():
        async def request():
            async with pool.slot() as slot:
                await slot.run(job)

        task = asyncio.create_task(request())
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.in_use == 1  # still taken: the job runs on
        release.set()
        for _ in range(500):
            if pool.in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.in_use == 0

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        pool.shutdown()


def test_a_semantic_only_model_refuses_other_tasks(tmp_path, photos):
    from test_segformer_parity import TINY_SEGFORMER_CONFIGS, build_reference_segformer

    name = sorted(TINY_SEGFORMER_CONFIGS)[0]
    directory = build_reference_segformer(tmp_path / "segformer", **TINY_SEGFORMER_CONFIGS[name])
    app = create_app(ModelRegistry.load([str(directory)], max_pixels=MAX_PIXELS))
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["models"][0]["tasks"] == ["semantic"]
        refused = _post(client, photos[0][1], task="panoptic")
        assert refused.status_code == 400 and refused.json()["error"] == "BadParameterError"
        assert "'panoptic' is not supported" in refused.json()["message"]
        auto = _post(client, photos[0][1])
        assert auto.status_code == 200 and auto.json()["task"] == "semantic"


# --- Segment Anything ----------------------------------------------------------------------


def test_mask_generation_answers_equal_omniseg_segment_everything(model_dir, photos, tmp_path):
    """A SAM model is served on /v1/mask-generation: its json and overlay answers are the
    bytes that ``omniseg segment --task everything`` writes; each route refuses the other's
    models with a message that names the right one, and no SAM model at all is a 404."""
    from reference_sam import TINY_SAM_CONFIGS, build_reference_sam

    sam_dir = build_reference_sam(tmp_path / "sam", perturb=0.3, **TINY_SAM_CONFIGS["deep"])
    registry = ModelRegistry.load([str(model_dir), str(sam_dir)], max_pixels=MAX_PIXELS)
    sam_name = str(sam_dir)
    name, data = photos[1]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / name), "--out", str(out), "--model", sam_name,
                 "--task", "everything", "--threshold", "0.5"]) == 0
    app = create_app(registry, workers=1, queue_size=2, max_upload_bytes=1_000_000)
    with TestClient(app) as client:
        kinds = {m["name"]: (m["kind"], m["tasks"]) for m in client.get("/v1/models").json()["models"]}
        assert kinds[sam_name] == ("mask-generation", ["everything"])
        assert kinds[str(model_dir)][0] == "image-segmentation"
        fields = {"threshold": "0.5", "model": sam_name}
        answer = client.post("/v1/mask-generation", files={"image": (name, data, "image/png")}, data=fields)
        assert answer.status_code == 200, answer.text
        document = answer.json()
        expected = json.loads((out / "crop1.json").read_text())
        assert document["segments"] == expected["segments"] and len(document["segments"]) > 0
        assert document["task"] == "everything"
        overlay = client.post("/v1/mask-generation", files={"image": (name, data, "image/png")},
                              data={**fields, "format": "overlay"})
        assert overlay.content == (out / "crop1_overlay.png").read_bytes()
        # Without a model name, the first SAM model answers.
        default = client.post("/v1/mask-generation", files={"image": (name, data, "image/png")},
                              data={"threshold": "0.5"})
        assert default.json()["segments"] == expected["segments"]

        wrong = client.post("/v1/segment", files={"image": (name, data, "image/png")}, data={"model": sam_name})
        assert wrong.status_code == 400 and "/v1/mask-generation" in wrong.json()["message"]
        wrong = client.post("/v1/mask-generation", files={"image": (name, data, "image/png")},
                            data={"model": str(model_dir)})
        assert wrong.status_code == 400 and "/v1/segment" in wrong.json()["message"]
        wrong = client.post("/v1/mask-generation", files={"image": (name, data, "image/png")},
                            data={"model": sam_name, "task": "panoptic"})
        assert wrong.status_code == 400 and "everything" in wrong.json()["message"]
        assert "/v1/mask-generation" in client.get("/openapi.json").json()["paths"]
        assert client.get("/healthz").status_code == 200  # still serving

    only_classes = ModelRegistry.load([str(model_dir)], max_pixels=MAX_PIXELS)
    with TestClient(create_app(only_classes)) as client:
        missing = client.post("/v1/mask-generation", files={"image": (name, data, "image/png")})
        assert missing.status_code == 404 and "no mask-generation model" in missing.json()["message"]
