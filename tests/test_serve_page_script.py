"""The page's script (``omniseg/serve/static/app.js``) under Node with a stub DOM and a
stub ``fetch`` whose answers the test releases in any order: request ordering that a real
browser test cannot pin down. Skipped without ``node``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE = shutil.which("node")
APP_JS = Path(__file__).resolve().parents[1] / "omniseg" / "serve" / "static" / "app.js"

pytestmark = pytest.mark.skipif(NODE is None, reason="no node on PATH")

# A DOM just large enough for app.js: elements by id with the properties it touches,
# images that "load" at once, and fetch answers held until the test releases them.
HARNESS = r"""
const vm = require("vm");
const fs = require("fs");
function element(id) {
  const el = {
    id, hidden: false, disabled: false, textContent: "", value: "", href: "", download: "",
    width: 0, height: 0, style: {}, dataset: {}, options: [], listeners: {},
    classList: { toggle() {}, add() {}, remove() {} },
    addEventListener(type, f) { this.listeners[type] = f; },
    removeAttribute() {}, replaceChildren() { this.options = []; }, add(o) { this.options.push(o); },
    append() {}, click() {}, remove() {}, getBoundingClientRect() { return { left: 0, top: 0, width: 1, height: 1 }; },
    getContext() {
      return { fillRect() {}, drawImage() {}, putImageData() {},
               getImageData: (x, y, w, h) => ({ data: new Uint8ClampedArray(4 * w * h) }) };
    },
  };
  const rows = [];
  el.tBodies = [{ rows, replaceChildren() { rows.length = 0; },
                  insertRow() { const r = { dataset: {}, className: "", classList: { toggle() {} },
                    addEventListener() {}, insertCell() { return { append() {}, textContent: "" }; } };
                    rows.push(r); return r; } }];
  return el;
}
const elements = {};
const pending = [];
const context = {
  console, Int32Array, Uint8ClampedArray, Math, Number, String, Object, Array, JSON, Promise, Error,
  setInterval: () => 0, clearInterval() {}, setTimeout: () => 0,
  performance: { now: () => 0 },
  document: { getElementById: (id) => (elements[id] ||= element(id)), addEventListener() {},
              createElement: (tag) => element(tag), body: { append() {} } },
  URL: { createObjectURL: (f) => "blob:" + (f.name || "x"), revokeObjectURL() {} },
  Blob: class { constructor(parts, options) { this.parts = parts; this.type = options && options.type; } },
  FormData: class { constructor() { this.fields = {}; } append(k, v) { this.fields[k] = v; } },
  Option: class { constructor(text, value) { this.text = text; this.value = value; } },
  Image: class { set src(url) { this._src = url; Promise.resolve().then(() => this.onload()); } },
  fetch(url, options) {
    if (url === "/v1/models") {
      return Promise.resolve(respond({ default: "m", models: [{ name: "m", kind: "image-segmentation",
        tasks: ["semantic"], labels: { 0: "a" }, colors: { 0: [1, 2, 3] } }] }));
    }
    return new Promise((resolve) => pending.push({ name: options.body.fields.image.name, resolve }));
  },
};
function respond(body, status = 200) {
  return { ok: status === 200, status, statusText: "", headers: { get: () => "application/json" },
           json: async () => body };
}
function answerFor(name) {
  return { image: name, width: 2, height: 1, task: "semantic", model: "m", label_map: null,
           segments: [{ id: 1, label_id: 0, label: "a", score: null, area: 2, bbox: [0, 0, 2, 1],
                        segmentation: { size: [1, 2], counts: "02" } }] };
}
const tick = () => new Promise((r) => setTimeout(r, 0));
vm.createContext(context);
vm.runInContext(fs.readFileSync(process.argv[2], "utf8") + "\n;globalThis.__state = state;", context);
(async () => {
  await tick();
  const file = (name) => ({ name, type: "image/png", size: 1000 });
  const change = elements["file"].listeners["change"];
  change({ target: { files: [file("first.png")] } });
  await tick();
  change({ target: { files: [file("second.png")] } });
  await tick();
  // The answers arrive in the order the test asks (argv[3]: "second,first" or "first,second").
  const byName = Object.fromEntries(pending.map((p) => [p.name.split(".")[0], p]));
  const snapshots = [];
  for (const which of process.argv[3].split(",")) {
    byName[which].resolve(respond(answerFor(byName[which].name)));
    await tick(); await tick();
    const state = context.__state;
    snapshots.push({ shown: state.answer && state.answer.image, progressHidden: elements["status"].hidden });
  }
  console.log(JSON.stringify({ requested: pending.map((p) => p.name), file: context.__state.file.name, snapshots }));
})();
"""


@pytest.mark.parametrize("order", ["second,first", "first,second"])
def test_only_the_latest_images_answer_is_shown(tmp_path, order) -> None:
    """Dropping a second image while the first is still being segmented: the first answer,
    arriving last, used to be drawn over the second image for good (and its JSON offered
    as the second's); arriving first, it was drawn over the second image meanwhile and hid
    the progress bar while the second request still ran."""
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    result = subprocess.run([NODE, str(harness), str(APP_JS), order], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["requested"] == ["first.png", "second.png"]
    assert outcome["file"] == "second.png"
    if order == "second,first":
        expected = [{"shown": "second.png", "progressHidden": True}] * 2
    else:
        expected = [{"shown": None, "progressHidden": False}, {"shown": "second.png", "progressHidden": True}]
    assert outcome["snapshots"] == expected
