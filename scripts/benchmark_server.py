"""Server start time and click latency over REST, cold (first click on a scan) vs warm (later clicks).

Serves one 4 mm whole-body phantom and one autoPET-sized phantom (400x400x326 at 2.036x2.036x3 mm)
and clicks on a lesion as OHIF does (NRRD reply). With ``--sam PRESET`` the clicks go to the 3D SAM
(``segany_pet``) serving random weights of that preset, with ``--model FILE`` serving that checkpoint
(the shipped default: ``model/segany_pet_small.pt``). Random weights time the model itself but not
the masks a trained model draws (their size sets the paste, quantify and write costs, and a blob
reaching the crop's faces adds windows). The table adds the predictor's own warm latency: the same click
through `Predictor.set_volume(...).predict(...)` in this process (what the server's infer task calls, the
uptake edge included; embeddings cached), so REST overhead = click / predictor. Warm clicks go in rounds of one
click per client plus one through the predictor, so that each ratio compares clicks made side by side. The
predictor's stages as the server reports them (crop + encode + decode + paste + edge) are shown next to it.

OHIF's warm click is timed seven ways side by side: from Debian's headless Chromium (``fetch`` from a page
of the server, as the OHIF panel sends it: the browser accepts zstd and decodes the reply natively), from the
same page through the project's OHIF add-on (``ohif_label_box.js``: an XMLHttpRequest as the panel's axios
sends it, answered with the mask's box and filled in to the whole label in the page: "label box"), from
Python ``requests`` accepting zstd, deflate, or neither (``Accept-Encoding: identity``: the raw label, the
path before replies were compressed) or asking for the mask's box and rebuilding the file (`nrrd_from_label_box`),
and over ``http.client`` (the transport of MONAI Label's Python
client, raw). Last, the reply's encodings on their own, in this process, on each scan's raw reply: zlib
over the whole body, `deflate_sparse` and `zstd_encode`, and decoding each; and Chromium's own floor: the same
reply, precomputed, fetched from a bare static server (Python's ``http.server``) raw, in zstd and in deflate, so
the browser's cost of handing a body of that size to the page is measured apart from the app's.

    .venv/bin/python scripts/benchmark_server.py [--starts 3] [--warm 5] [--sam PRESET | --model FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os

# As the server (segany_pet.cli.SERVER_ENVIRONMENT): the in-process predictor timing must not busy-wait while
# the server, Chromium and this process share 2 cores. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests
import torch
from backports import zstd
from playwright.sync_api import sync_playwright

import segany_pet.label
from segany_pet.cli import server_command, server_environment
from segany_pet.label.infer import DEFAULT_EDGE, OHIF_RESULT_PARAMS
from segany_pet.label.replies import DEFLATE_LEVEL, LABEL_BOX_HEADER, ZSTD_LEVEL, deflate_sparse, zstd_encode
from segany_pet.model import PRESETS, build_model, load_checkpoint, save_checkpoint
from segany_pet.pet import load_nifti, nrrd_from_label_box, save_nifti
from segany_pet.phantom import generate_case
from segany_pet.predictor import Predictor
from segany_pet.prompts import centre_click

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
# A click as the OHIF panel sends it, timed in the page until the whole reply is in an ArrayBuffer, and until
# fetch resolves (the reply's headers are in; the rest is the browser decoding the body and handing it over).
BROWSER_CLICKS = """async ([path, params, count]) => {
    const seconds = [];
    for (let i = 0; i < count; i++) {
        const form = new FormData();
        form.append("params", params);
        const started = performance.now();
        const reply = await fetch(path, {method: "POST", body: form});
        const headers = performance.now();
        if (!reply.ok) throw new Error(`infer answered ${reply.status}: ${await reply.text()}`);
        await reply.arrayBuffer();
        seconds.push([(performance.now() - started) / 1000, (headers - started) / 1000]);
    }
    return seconds;
}"""


# The same click as the OHIF panel's axios sends it (XMLHttpRequest, FormData, an ArrayBuffer reply), with the
# project's OHIF add-on in the page (it asks for the mask's box and fills the whole label in), timed until the
# panel would hold the whole label.
BROWSER_LABEL_BOX_CLICKS = """async ([path, params, count]) => {
    const seconds = [];
    for (let i = 0; i < count; i++) {
        const form = new FormData();
        form.append("params", params);
        const started = performance.now();
        const label = await new Promise((resolve, reject) => {
            const request = new XMLHttpRequest();
            request.open("POST", path);
            request.responseType = "arraybuffer";
            request.onloadend = () => request.status === 200 ? resolve(request.response)
                : reject(new Error(`infer answered ${request.status}`));
            request.send(form);
        });
        seconds.push([(performance.now() - started) / 1000, label.byteLength]);
    }
    return seconds;
}"""
LABEL_BOX_ADDON = Path(segany_pet.label.__file__).with_name("ohif_label_box.js")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(studies: Path, log_path: Path, conf=()) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with open(log_path, "a") as log:
        command = server_command(studies, port=port, conf=conf)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_environment())
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        try:
            if requests.get(f"{url}/info/", timeout=2).status_code == 200:
                return process, url, time.perf_counter() - started
        except requests.ConnectionError:
            time.sleep(0.05)


def ohif_params(voxel: list[int], **extra) -> str:
    return json.dumps({"foreground": [voxel], "background": [], **OHIF_RESULT_PARAMS, **extra})


# Accept-Encoding headers of the timed requests clicks: the reply's coding each one gets.
CLIENT_ENCODINGS = {"zstd": "zstd", "deflate": "gzip, deflate", "raw": "identity"}


def click(url: str, model: str, image: str, voxel: list[int], output: str = "all",
          encoding: str = "zstd, gzip, deflate") -> tuple[float, dict | None]:
    """One click with OHIF's params: (seconds, the server's latencies; None with output=image, as OHIF asks,
    where the reply is the label file alone)."""
    started = time.perf_counter()
    response = requests.post(f"{url}/infer/{model}", params={"image": image, "output": output},
                             data={"params": ohif_params(voxel)}, headers={"Accept-Encoding": encoding}, timeout=300)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    if output == "image":
        return elapsed, None
    reply_params = json.loads(response.content.split(b"\r\n\r\n", 2)[1].split(b"\r\n--")[0])
    return elapsed, reply_params["latencies"]


def label_box_click(url: str, model: str, image: str, voxel: list[int]) -> float:
    """OHIF's click from ``requests`` asking for the mask's box (``label_box``), the whole NRRD rebuilt from it
    (`nrrd_from_label_box`): seconds until the client holds the whole file."""
    started = time.perf_counter()
    response = requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"},
                             data={"params": ohif_params(voxel, label_box=True)}, timeout=300)
    response.raise_for_status()
    nrrd_from_label_box(response.content, response.headers[LABEL_BOX_HEADER])
    return time.perf_counter() - started


def http_client_click(url: str, model: str, image: str, voxel: list[int]) -> float:
    """OHIF's click over ``http.client``, the transport of MONAI Label's Python client (and Slicer's copy of it):
    it asks for ``Accept-Encoding: identity``, so the label comes raw."""
    address = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode({"image": image, "output": "image"})
    body = urllib.parse.urlencode({"params": ohif_params(voxel)})
    started = time.perf_counter()
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=300)
    try:
        connection.request("POST", f"/infer/{model}?{query}", body,
                           {"Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"infer answered {response.status}")
    return time.perf_counter() - started


def browser_clicks(page, model: str, image: str, voxel: list[int], count: int) -> list[list[float]]:
    """[seconds to the whole reply, seconds to its headers] of each click."""
    return page.evaluate(BROWSER_CLICKS, [f"/infer/{model}?image={image}&output=image", ohif_params(voxel), count])


def browser_label_box_clicks(page, model: str, image: str, voxel: list[int], count: int) -> list[list[float]]:
    """[seconds to the whole label in the page, its bytes] of each click, through the OHIF add-on."""
    return page.evaluate(BROWSER_LABEL_BOX_CLICKS,
                         [f"/infer/{model}?image={image}&output=image", ohif_params(voxel), count])


def predictor_click_seconds(predictor: Predictor, volume, volume_id: str, voxel: list[int]) -> float:
    """Wall time of one click through the predictor in this process, as the server's infer task makes it for a
    request without a client session: a session from the (cached) volume, then the click."""
    started = time.perf_counter()
    predictor.set_volume(volume, volume_id).predict(foreground=[voxel], edge=DEFAULT_EDGE)
    return time.perf_counter() - started


def _median_seconds(function, repeats: int):
    runs, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), result


def encoding_row(url: str, model: str, name: str, voxel: list[int], repeats: int = 3) -> tuple[str, bytes]:
    """The reply's encodings alone, in this process: encoding and decoding time and size of each (a table row),
    and the raw reply."""
    body = requests.post(f"{url}/infer/{model}", params={"image": name, "output": "image"},
                         data={"params": ohif_params(voxel)}, headers={"Accept-Encoding": "identity"},
                         timeout=300).content
    codecs = {
        "zlib": (lambda: zlib.compress(body, DEFLATE_LEVEL), zlib.decompress),
        "deflate_sparse": (lambda: deflate_sparse(body), zlib.decompress),
        "zstd_encode": (lambda: zstd_encode(body), zstd.decompress),
    }
    cells = []
    for encode, decode in codecs.values():
        encode_seconds, encoded = _median_seconds(encode, repeats)
        decode_seconds, decoded = _median_seconds(lambda: decode(encoded), repeats)  # noqa: B023 (called at once)
        assert decoded == body
        cells.append(f"{encode_seconds:.4f} / {decode_seconds:.4f} s ({len(encoded) / 1e3:.0f} kB)")
    return f"| {name} | {len(body) / 1e6:.1f} MB | " + " | ".join(cells) + " |", body


STATIC_FETCHES = """async ([path, count]) => {
    const seconds = [];
    for (let i = 0; i < count; i++) {
        const started = performance.now();
        const reply = await fetch(path, {cache: "no-store"});
        await reply.arrayBuffer();
        seconds.push((performance.now() - started) / 1000);
    }
    return seconds;
}"""


def serve_static(bodies: dict[str, tuple[bytes, str | None]]) -> ThreadingHTTPServer:
    """A bare HTTP server in a thread answering ``GET /<name>`` with ``bodies[name]`` (bytes, Content-Encoding)
    and ``/`` with an empty page to fetch from."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 (http.server's name)
            page = self.path == "/"
            body, coding = (b"<html></html>", None) if page else bodies.get(self.path.strip("/"), (b"", None))
            self.send_response(200 if page or self.path.strip("/") in bodies else 404)
            self.send_header("Content-Type", "text/html" if page else "application/octet-stream")
            if coding:
                self.send_header("Content-Encoding", coding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def static_fetch_seconds(browser, body: bytes, rounds: int) -> dict[str, float]:
    """Median seconds for Chromium to fetch ``body`` into an ArrayBuffer from a static server, per coding."""
    bodies = {"raw": (body, None), "zstd": (zstd_encode(body), "zstd"), "deflate": (deflate_sparse(body), "deflate")}
    server = serve_static(bodies)
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        runs = {name: [] for name in bodies}
        for _ in range(rounds):  # interleaved, as the clicks are
            for name in bodies:
                runs[name] += page.evaluate(STATIC_FETCHES, [f"/{name}", 1])
        return {name: statistics.median(seconds) for name, seconds in runs.items()}
    finally:
        page.close()
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=3, help="server starts to time")
    parser.add_argument("--warm", type=int, default=5, help="warm clicks per scan")
    served = parser.add_mutually_exclusive_group()
    served.add_argument("--sam", choices=sorted(PRESETS), help="click the 3D SAM of this preset (random weights)")
    served.add_argument("--model", type=Path, help="click the 3D SAM serving this checkpoint")
    args = parser.parse_args()
    sam = bool(args.sam or args.model)
    model = "segany_pet" if sam else "suv_threshold"

    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "images"
        studies.mkdir()
        clicks = {}
        for name, grid in (("wholebody_4mm", "4mm"), ("autopet_size", "autopet")):
            case = generate_case(11, tracer="fdg", grid=grid, negative=False)
            save_nifti(case.suv, case.affine, studies / f"{name}.nii.gz")
            biggest = max(case.info["lesions"], key=lambda lesion: lesion["volume_ml"])
            clicks[name] = (centre_click(case.lesions == biggest["id"], case.info["spacing"]), case.suv.shape)
        log_path = Path(tmp) / "server.log"
        conf = ()
        if args.sam:
            torch.manual_seed(0)
            conf = [("model", save_checkpoint(build_model(args.sam), Path(tmp) / f"{args.sam}.pt"))]
        elif args.model:
            conf = [("model", args.model.resolve())]
        predictor = Predictor(load_checkpoint(conf[0][1])) if conf else None

        start_times = []
        for _ in range(args.starts):
            process, url, seconds = start_server(studies, log_path, conf)
            start_times.append(seconds)
            process.terminate()
            process.wait()
        print(f"server start to first /info answer: median {statistics.median(start_times):.2f} s "
              f"over {args.starts} starts ({', '.join(f'{s:.2f}' for s in start_times)})\n")

        process, url, _ = start_server(studies, log_path, conf)
        served_by = f" ({args.sam}, random weights)" if args.sam else f" ({args.model})" if args.model else ""
        print(f"clicks on {model}{served_by}\n")
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"{url}/info/")  # a page of the server's origin, as OHIF's panel is
            page.add_script_tag(content=LABEL_BOX_ADDON.read_text(encoding="utf-8"))
            try:
                predictor_parts = ("crop", "encode", "decode", "paste", "edge")
                clients = " / ".join(["Chromium", "Chromium label box", *(f"requests {coding}" for coding in
                                                                        CLIENT_ENCODINGS), "requests label box",
                                      "http.client raw"])
                print(f"| scan | shape | cold click (s) | warm OHIF click median (s): {clients} | with params (s) | "
                      "cold / warm | warm server-side (s) |"
                      + (f" predictor warm (s): in-process / stages | warm click / predictor: {clients} |"
                         if sam else ""))
                print("|---|---|---|---|---|---|---|" + ("---|---|" if sam else ""))
                predictor_medians = {}
                for name, (voxel, shape) in clicks.items():
                    cold, _ = click(url, model, name, voxel)
                    # output=image is OHIF's request (the label file alone); output=all adds the reply params
                    # (PET numbers, latencies) in a multipart reply, as the Python client and Slicer read them.
                    if predictor is not None:  # cold in-process: reads nothing more, encodes its crop
                        volume = load_nifti(studies / f"{name}.nii.gz")
                        predictor_click_seconds(predictor, volume, name, voxel)
                    # Rounds of one click per client (and one through the predictor), so that every column
                    # is measured under the same conditions, side by side.
                    in_browser, boxed, clients_runs, warm_runs, predictor_runs = [], [], [], [], []
                    for _ in range(args.warm):
                        in_browser += browser_clicks(page, model, name, voxel, 1)
                        boxed += browser_label_box_clicks(page, model, name, voxel, 1)
                        clients_runs.append(
                            [click(url, model, name, voxel, "image", encoding)[0]
                             for encoding in CLIENT_ENCODINGS.values()]
                            + [label_box_click(url, model, name, voxel), http_client_click(url, model, name, voxel)]
                        )
                        warm_runs.append(click(url, model, name, voxel))
                        if predictor is not None:
                            predictor_runs.append(predictor_click_seconds(predictor, volume, name, voxel))
                    chromium = statistics.median(whole for whole, _ in in_browser)
                    chromium_headers = statistics.median(headers for _, headers in in_browser)
                    label_bytes = {int(size) for _, size in boxed}
                    assert len(label_bytes) == 1 and label_bytes.pop() > np.prod(shape), "the add-on's label is cut"
                    warm_ohif = [chromium, statistics.median(seconds for seconds, _ in boxed)]
                    warm_ohif += [statistics.median(column) for column in zip(*clients_runs, strict=True)]
                    warm = statistics.median(seconds for seconds, _ in warm_runs)
                    server_side = ", ".join(
                        f"{part} {statistics.median(latencies[part] for _, latencies in warm_runs):.3f}"
                        for part in warm_runs[0][1]
                    )
                    size = "x".join(map(str, shape))
                    row = (f"| {name} | {size} | {cold:.3f} | {' / '.join(f'{t:.3f}' for t in warm_ohif)} "
                           f"(Chromium's headers in {chromium_headers:.3f}) | "
                           f"{warm:.3f} | {cold / chromium:.1f} | {server_side} |")
                    if sam:
                        stages = statistics.median(sum(lat[p] for p in predictor_parts) for _, lat in warm_runs)
                        in_process = predictor_medians[name] = statistics.median(predictor_runs)
                        row += (f" {in_process:.3f} / {stages:.3f} | "
                                + " / ".join(f"{t / in_process:.1f}x" for t in warm_ohif) + " |")
                    print(row)
                print(f"\n| scan | raw reply | encode / decode: zlib level {DEFLATE_LEVEL}, whole body | "
                      f"deflate_sparse | zstd level {ZSTD_LEVEL} |")
                print("|---|---|---|---|---|")
                bodies = {}
                for name, (voxel, _) in clicks.items():
                    row, bodies[name] = encoding_row(url, model, name, voxel)
                    print(row)
                print("\n| scan | Chromium fetching the same reply from a static server (s): raw / zstd / deflate |"
                      + (" its floor: (predictor + zstd fetch) / predictor |" if sam else ""))
                print("|---|---|" + ("---|" if sam else ""))
                for name, body in bodies.items():
                    floor = static_fetch_seconds(browser, body, max(args.warm, 5))
                    row = f"| {name} | " + " / ".join(f"{seconds:.3f}" for seconds in floor.values()) + " |"
                    if sam:
                        row += f" {(predictor_medians[name] + floor['zstd']) / predictor_medians[name]:.1f}x |"
                    print(row)
            finally:
                browser.close()
                process.terminate()
                process.wait()
    print(f"\n{os.cpu_count()} CPU cores; requests over HTTP on 127.0.0.1 with OHIF's params")


if __name__ == "__main__":
    main()
