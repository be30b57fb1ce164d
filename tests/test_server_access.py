"""A server a lab can put on its network, tried as an attacker and a careless client would: names that point
outside the datastore, uploads that are not PET, requests that used to crash it, oversized bodies, temporary
files left behind; and with sign-in on, tokens, roles and origins."""

from __future__ import annotations

import gzip
import http.server
import io
import json
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from segany_pet.label.access import add_account, remove_account
from support import BAD_IMAGES, LARGE_SCAN, running_server

pytestmark = pytest.mark.server

LAB_ORIGIN = "https://viewer.lab.example"
MAX_REQUEST_MB = 24


def nifti_bytes(array, affine=None) -> bytes:
    image = nib.Nifti1Image(array, np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine)
    return gzip.compress(image.to_bytes())


def huge_header_bytes() -> bytes:
    """A NIfTI header claiming 20000^3 float32 voxels, followed by almost nothing."""
    header = nib.Nifti1Header()
    header.set_data_shape((20000, 20000, 20000))
    header.set_data_dtype(np.float32)
    buffer = io.BytesIO()
    header.write_to(buffer)
    return gzip.compress(buffer.getvalue() + bytes(4096))


@pytest.fixture(scope="module")
def studies(cohort, tmp_path_factory) -> Path:
    """A throw-away datastore: two phantoms of the test cohort."""
    folder = tmp_path_factory.mktemp("lab") / "studies"
    folder.mkdir()
    cases = sorted(p for p in (cohort / "images").glob("*.nii.gz")
                   if p.name.split(".")[0] not in (*BAD_IMAGES, LARGE_SCAN))[:2]
    for path in cases:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def case(studies) -> str:
    return sorted(studies.glob("*.nii.gz"))[0].name.removesuffix(".nii.gz")


@pytest.fixture(scope="module")
def open_server(studies, random_checkpoint, tmp_path_factory):
    """Sign-in off, listening on every address (as a careless lab would start it), its temporary files in a
    folder of its own: (url, temporary folder, log file)."""
    logs = tmp_path_factory.mktemp("open_server")
    temporary = logs / "tmp"
    temporary.mkdir()
    conf = [("model", random_checkpoint), ("max_request_mb", MAX_REQUEST_MB)]
    with running_server(studies, conf, logs, host="0.0.0.0", env={"TMPDIR": str(temporary)}) as url:
        yield url, temporary, logs / "server.log"


def label_of(studies: Path, case: str, values=(0, 1)) -> bytes:
    image = nib.load(studies / f"{case}.nii.gz")
    label = np.zeros(image.shape, np.uint8)
    centre = tuple(n // 2 for n in image.shape)
    label[tuple(slice(c - 2, c + 3) for c in centre)] = values[-1]
    return nifti_bytes(label, image.affine)


def put_label(url, case, body: bytes, tag="final", name="label.nii.gz", headers=None):
    return requests.put(f"{url}/datastore/label", params={"image": case, "tag": tag},
                        files={"label": (name, body)}, headers=headers, timeout=60)


def put_image(url, image, body: bytes, name="scan.nii.gz", headers=None):
    return requests.put(f"{url}/datastore/image", params={"image": image} if image else None,
                        files={"file": (name, body)}, headers=headers, timeout=60)


def training_jobs(url, headers=None) -> list:
    response = requests.get(f"{url}/train/", params={"all": True}, headers=headers, timeout=30)
    return [] if response.status_code == 404 else response.json()  # MONAI Label's "No Train Tasks Found"


def listed(url, headers=None) -> dict:
    return requests.get(f"{url}/datastore/", params={"output": "all"}, headers=headers, timeout=30).json()


# ------------------------------------------------------------------------------------------------------
# Confinement

def test_client_names_never_reach_outside_the_datastore(open_server, studies, case, tmp_path):
    url, _, _ = open_server
    outside = tmp_path / "outside"
    outside.mkdir()
    scan = (studies / f"{case}.nii.gz").read_bytes()
    before = listed(url)

    for image in (str(outside / "evil"), "../escape", "..", "a/b", "x\\y", ".hidden"):
        response = put_image(url, image, scan)
        assert response.status_code == 422 and "not a valid name" in response.json()["detail"], (image, response.text)
    response = put_label(url, case, label_of(studies, case), tag="../../../../evil")
    assert response.status_code == 422 and "label tag" in response.json()["detail"]
    response = put_label(url, "../" + case, label_of(studies, case))
    assert response.status_code == 422

    # Infer reads only the datastore: a path is no image id, and params cannot set one.
    shutil.copy(studies / f"{case}.nii.gz", outside / "copy.nii.gz")
    click = json.dumps({"foreground": [[10, 10, 10]]})
    response = requests.post(f"{url}/infer/segany_pet", params={"image": str(outside / "copy.nii.gz")},
                             data={"params": click}, timeout=60)
    assert response.status_code == 422, response.text
    response = requests.post(f"{url}/infer/segany_pet", params={"image": case, "output": "json"},
                             data={"params": json.dumps({"foreground": [[10, 10, 10]],
                                                         "image": str(outside / "copy.nii.gz")})}, timeout=60)
    assert response.status_code == 422 and "may not set image" in response.json()["detail"]

    for path, params in [("/datastore/image", {"image": "../" + case}),
                         ("/datastore/label", {"label": case, "tag": "../final"}),
                         ("/datastore/image/info", {"image": str(studies / case)})]:
        assert requests.get(url + path, params=params, timeout=30).status_code == 422, path
    # A session id names a folder that DELETE removes.
    canary = tmp_path / "canary"
    canary.mkdir()
    response = requests.delete(f"{url}/session/{'..%2F' * 12}{str(canary).lstrip('/').replace('/', '%2F')}",
                               timeout=30)
    assert response.status_code in (404, 422) and canary.exists()

    assert sorted(p.name for p in outside.iterdir()) == ["copy.nii.gz"]
    assert not list(studies.parent.rglob("evil*")) and not list(studies.parent.rglob("escape*"))
    assert listed(url) == before


BAD_UPLOADS = {
    "corrupt": (b"\x1f\x8b this is not a NIfTI file" + bytes(range(256)), "cannot be read"),
    "text": (b"patient,suv\n1,2.5\n", "cannot be read"),
    "flat_2d": (nifti_bytes(np.ones((32, 32), np.float32)), "3D"),
    "huge_header": (huge_header_bytes(), "voxels"),
    "nan_filled": (nifti_bytes(np.full((16, 16, 16), np.nan, np.float32)), "NaN"),
    "raw_bq_per_ml": (nifti_bytes(np.full((16, 16, 16), 12000.0, np.float32)), "Bq/mL"),
}


@pytest.mark.parametrize("kind", BAD_UPLOADS)
def test_uploads_get_the_checks_of_the_infer_path(open_server, kind):
    url, _, _ = open_server
    body, words = BAD_UPLOADS[kind]
    before = listed(url)
    response = put_image(url, kind, body)
    assert response.status_code == 422 and words in response.json()["detail"], response.text
    assert kind in response.json()["detail"]  # names the upload, not a temporary file
    response = requests.post(f"{url}/infer/segany_pet", params={"output": "json"}, files={"file": ("x.nii.gz", body)},
                             data={"params": json.dumps({"foreground": [[4, 4, 4]]})}, timeout=60)
    assert response.status_code == 422 and words in response.json()["detail"], response.text
    assert listed(url) == before
    assert put_image(url, "not_nifti", body, name="scan.png").status_code == 422


def test_labels_must_fit_their_image(open_server, studies, case):
    url, _, _ = open_server
    image = nib.load(studies / f"{case}.nii.gz")
    shifted = image.affine.copy()
    shifted[:3, 3] += 4.0
    bad = {
        "other shape": (nifti_bytes(np.zeros((8, 8, 8), np.uint8), image.affine), "shape"),
        "other values": (label_of(studies, case, values=(0, 7)), "values [7]"),
        "fractions": (nifti_bytes(np.full(image.shape, 0.5, np.float32), image.affine), "values"),
        "text": (b"lesion at 40 31 10", "cannot be read"),
        "another grid": (nifti_bytes(np.zeros(image.shape, np.uint8), shifted), "affine"),
    }
    for what, (body, words) in bad.items():
        response = put_label(url, case, body)
        assert response.status_code == 422 and words in response.json()["detail"], (what, response.text)
    assert put_label(url, "no_such_scan", label_of(studies, case)).status_code == 404
    assert "final" not in listed(url)["objects"][case]["labels"]

    good = label_of(studies, case)
    response = put_label(url, case, good, tag="review")
    assert response.status_code == 200, response.text
    stored = requests.get(f"{url}/datastore/label", params={"label": case, "tag": "review"}, timeout=30)
    assert stored.status_code == 200 and stored.content == good


# ------------------------------------------------------------------------------------------------------
# Bad input is a 4xx

def test_requests_that_crashed_the_server_are_answered_with_a_4xx(open_server, case):
    url, _, _ = open_server
    click = {"params": json.dumps({"foreground": [[10, 10, 10]]})}
    attempts = [
        ("PUT", "/datastore/image/info", {"params": {"image": "no_such_scan"}, "data": {"info": "{}"}}, 404),
        ("PUT", "/datastore/image/info", {"params": {"image": case}, "data": {"info": "[1, 2]"}}, 422),
        ("PUT", "/datastore/label/info", {"params": {"label": "no_such_scan", "tag": "final"},
                                          "data": {"info": "{}"}}, 404),
        ("DELETE", "/datastore/image", {"params": {"id": "no_such_scan"}}, 404),
        ("DELETE", "/datastore/label", {"params": {"id": case, "tag": "no_such_tag"}}, 404),
        ("POST", "/activelearning/no_such_strategy", {}, 404),
        ("POST", "/infer/segany_pet", {"params": {"image": case},
                                       "data": {"params": json.dumps({"foreground": [[2**70, 1, 1]]})}}, 422),
        ("POST", "/infer/segany_pet", {"params": {"image": case}, "data": {"params": "[[1, 2, 3]]"}}, 422),
        ("POST", "/infer/segany_pet", {"params": {"image": case}, "data": {"params": "{'foreground'"}}, 400),
        ("POST", "/infer/segany_pet", {}, 422),
        ("POST", "/infer/no_such_model", {"params": {"image": case}, "data": click}, 400),
        ("GET", "/session/no_such_session", {}, 422),
        ("GET", "/session/0b8c0d5e-3b0a-11ef-9a1c-0242ac120002", {}, 404),
        ("DELETE", "/session/no_such_session", {}, 422),
        ("GET", "/logs/gpu", {}, 404),
        ("POST", "/train/no_such_task", {}, 404),
        ("POST", "/scoring/no_such_method", {}, 404),
        ("GET", "/datastore/dataset", {"params": {"limit_cases": -1}}, 422),
        ("PUT", "/model/segany_pet", {"files": {"file": ("weights.pt", b"not a checkpoint")}}, 422),
        ("PUT", "/model/no_such_model", {"files": {"file": ("weights.pt", b"x")}}, 404),
        ("DELETE", "/model/segany_pet", {}, 404),
        ("POST", "/infer/wsi/segany_pet", {}, 404),
        ("POST", "/batch/infer/segany_pet", {}, 404),
    ]
    for method, path, options, status in attempts:
        response = requests.request(method, url + path, timeout=60, **options)
        assert response.status_code == status, (method, path, response.status_code, response.text)
        assert response.json()["detail"], (method, path)
    assert not training_jobs(url), "an unknown training task started a job"
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200


def test_no_request_leaves_a_temporary_file(open_server, studies, case):
    url, temporary, _ = open_server
    scan = (studies / f"{case}.nii.gz").read_bytes()
    click = {"params": json.dumps({"foreground": [[10, 10, 10]]})}
    at_start = {p for p in temporary.rglob("*") if p.is_file()}  # MONAI Label's log configuration
    assert put_label(url, case, label_of(studies, case)).status_code == 200  # something to export
    for _ in range(2):
        export = requests.get(f"{url}/datastore/dataset", timeout=120)
        assert export.status_code == 200 and export.content[:2] == b"PK"
    assert put_image(url, "rejected", BAD_UPLOADS["corrupt"][0]).status_code == 422
    assert put_label(url, case, b"not a label").status_code == 422
    rejected = requests.post(f"{url}/infer/segany_pet", files={"file": ("x.nii.gz", b"not a scan")}, data=click,
                             timeout=60)
    assert rejected.status_code == 422
    uploaded = requests.post(f"{url}/infer/segany_pet", params={"output": "json"},
                             files={"file": ("scan.nii.gz", scan)}, data=click, timeout=120)
    assert uploaded.status_code == 200, uploaded.text
    stored = requests.post(f"{url}/infer/segany_pet", params={"image": case}, data=click, timeout=120)
    assert stored.status_code == 200
    time.sleep(1.0)  # background tasks run after the reply
    assert sorted(p.name for p in temporary.rglob("*") if p.is_file() and p not in at_start) == []


def test_request_bodies_are_bounded(open_server, case):
    url, _, _ = open_server
    body = bytes(MAX_REQUEST_MB * 2**20 + 1)
    response = put_image(url, "too_big", body)
    assert response.status_code == 413 and "max_request_mb" in response.json()["detail"]

    def chunks():  # no Content-Length: the server counts what arrives
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.nii.gz"\r\n\r\n'
        for _ in range(MAX_REQUEST_MB + 1):
            yield bytes(2**20)
        yield b"\r\n--b--\r\n"

    response = requests.put(f"{url}/datastore/image", params={"image": "too_big"}, data=chunks(),
                            headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=60)
    assert response.status_code == 413
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200


def test_a_server_without_sign_in_beyond_loopback_says_so_loudly(open_server):
    _, _, log = open_server
    assert "SIGN-IN IS OFF and the server listens on 0.0.0.0" in log.read_text()


def test_origins_other_than_the_servers_own_are_not_allowed_by_default(open_server):
    url, _, _ = open_server
    preflight = requests.options(f"{url}/datastore/image", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "DELETE"}, timeout=30)
    assert "access-control-allow-origin" not in preflight.headers
    response = requests.get(f"{url}/info/", headers={"Origin": "http://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers


# ------------------------------------------------------------------------------------------------------
# Sign-in, roles and origins

@pytest.fixture(scope="module")
def lab_server(studies, random_checkpoint, tmp_path_factory):
    """Sign-in on, one configured origin: (url, {role: token}, accounts file)."""
    folder = tmp_path_factory.mktemp("lab_server")
    accounts = folder / "tokens.json"
    tokens = {"annotator": add_account(accounts, "alice", "annotator"), "admin": add_account(accounts, "boss", "admin")}
    conf = [("model", random_checkpoint), ("auth_tokens", accounts), ("cors_origins", LAB_ORIGIN)]
    headers = {"Authorization": f"Bearer {tokens['admin']}"}
    with running_server(studies, conf, folder, headers=headers) as url:
        yield url, tokens, accounts


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_without_a_valid_token_only_the_viewer_and_the_sign_in_handshake_answer(lab_server):
    url, tokens, _ = lab_server
    for headers in ({}, bearer("not-a-token"), {"Authorization": f"Basic {tokens['admin']}"}):
        for method, path in [("GET", "/info/"), ("GET", "/datastore/"), ("POST", "/infer/segany_pet"),
                             ("DELETE", "/datastore/image?id=x"), ("GET", "/logs/"), ("GET", "/openapi.json")]:
            response = requests.request(method, url + path, headers=headers, timeout=30)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{url}/ohif/", timeout=30).status_code == 200
    assert requests.get(f"{url}/auth/", timeout=30).json()["enabled"] is True


def test_annotators_infer_fetch_and_save_labels_and_only_admins_change_the_rest(lab_server, studies, case):
    url, tokens, _ = lab_server
    annotator, admin = bearer(tokens["annotator"]), bearer(tokens["admin"])
    click = {"params": json.dumps({"foreground": [[10, 10, 10]]})}
    allowed = [
        ("GET", "/info/", {}),
        ("GET", "/datastore/", {}),
        ("GET", "/datastore/image", {"params": {"image": case}}),
        ("POST", "/infer/segany_pet", {"params": {"image": case, "output": "json"}, "data": click}),
        ("PUT", "/datastore/label", {"params": {"image": case, "tag": "final"},
                                     "files": {"label": ("label.nii.gz", label_of(studies, case))}}),
        ("GET", "/datastore/label", {"params": {"label": case, "tag": "final"}}),
        ("POST", "/activelearning/first", {"json": {}}),
    ]
    for method, path, options in allowed:
        response = requests.request(method, url + path, headers=annotator, timeout=120, **options)
        assert response.status_code == 200, (method, path, response.text)
    assert requests.get(f"{url}/train/", headers=annotator, timeout=30).status_code == 404  # no job yet: not a 403
    # What the annotator may not: each answered 403 before anything happens.
    forbidden = [
        ("DELETE", "/datastore/image", {"params": {"id": case}}),
        ("DELETE", "/datastore/label", {"params": {"id": case, "tag": "final"}}),
        ("PUT", "/datastore/image", {"params": {"image": "another"},
                                     "files": {"file": ("s.nii.gz", (studies / f"{case}.nii.gz").read_bytes())}}),
        ("PUT", "/datastore/image/info", {"params": {"image": case}, "data": {"info": "{}"}}),
        ("PUT", "/model/segany_pet", {"files": {"file": ("weights.pt", b"x")}}),
        ("DELETE", "/model/segany_pet", {}),
        ("GET", "/model/segany_pet", {}),
        ("POST", "/train/segany_pet", {"json": {}}),
        ("DELETE", "/train/", {}),
        ("POST", "/scoring/cross_prompt", {"json": {}}),
        ("GET", "/logs/", {}),
        ("GET", "/datastore/dataset", {}),
        ("POST", "/reload", {}),
    ]
    for method, path, options in forbidden:
        response = requests.request(method, url + path, headers=annotator, timeout=60, **options)
        assert response.status_code == 403, (method, path, response.text)
        assert "admin role" in response.json()["detail"] and "alice" in response.json()["detail"]
    assert case in listed(url, admin)["objects"] and "final" in listed(url, admin)["objects"][case]["labels"]
    assert not training_jobs(url, admin)

    # The admin may; MONAI Label records the signed-in account as the user.
    assert requests.get(f"{url}/logs/", params={"text": True}, headers=admin, timeout=30).status_code == 200
    served = requests.post(f"{url}/activelearning/first", json={}, headers=annotator, timeout=30).json()
    assert served["strategy"]["first"]["client_id"] == "alice"
    response = requests.delete(f"{url}/datastore/label", params={"id": case, "tag": "final"}, headers=admin,
                               timeout=30)
    assert response.status_code == 200 and "final" not in listed(url, admin)["objects"][case]["labels"]


def test_the_python_client_and_slicer_sign_in_with_name_and_token(lab_server, studies, case, tmp_path):
    url, tokens, _ = lab_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    assert client.auth_enabled()
    with pytest.raises(MONAILabelClientException):
        client.info()
    with pytest.raises(MONAILabelClientException):
        client.auth_token("alice", tokens["admin"])  # another account's token
    client.update_auth(client.auth_token("alice", tokens["annotator"]))
    assert client.auth_valid_token()
    assert "segany_pet" in client.info()["models"]
    # Slicer's way with a scan the server does not hold: upload it as a session, then click on it. (First: the
    # client's infer leaves its multipart Content-Type in the headers it sends with every later request.)
    session = client.create_session(str(studies / f"{case}.nii.gz"))
    label_path, reply = client.infer("segany_pet", "", {"foreground": [[10, 10, 10]]},
                                     session_id=session["session_id"])
    assert Path(label_path).exists() and "quantification" in reply
    client.remove_session(session["session_id"])
    label_path, reply = client.infer("segany_pet", case, {"foreground": [[10, 10, 10]]})
    assert Path(label_path).exists() and "quantification" in reply
    with pytest.raises(MONAILabelClientException) as refused:
        client.train_start("segany_pet", {})
    assert "Status: 403" in str(refused.value)


def test_a_removed_account_is_refused_at_once(lab_server):
    url, _, accounts = lab_server
    token = add_account(accounts, "carol", "annotator")
    assert requests.get(f"{url}/info/", headers=bearer(token), timeout=30).status_code == 200
    time.sleep(0.01)  # a later modification time than the add's
    assert remove_account(accounts, "carol")
    assert requests.get(f"{url}/info/", headers=bearer(token), timeout=30).status_code == 401


def test_only_configured_origins_may_call_the_server_from_their_pages(lab_server):
    url, tokens, _ = lab_server
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = requests.options(f"{url}/infer/segany_pet", headers={"Origin": LAB_ORIGIN, **preflight}, timeout=30)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == LAB_ORIGIN
    assert "access-control-allow-credentials" not in allowed.headers
    refused = requests.options(f"{url}/infer/segany_pet", headers={"Origin": "http://evil.example", **preflight},
                               timeout=30)
    assert "access-control-allow-origin" not in refused.headers
    # A signed-in page of the lab's viewer reads the reply (and the label box header).
    reply = requests.get(f"{url}/info/", headers={"Origin": LAB_ORIGIN, **bearer(tokens["annotator"])}, timeout=30)
    assert reply.headers["access-control-allow-origin"] == LAB_ORIGIN
    assert "X-Label-Box" in reply.headers["access-control-expose-headers"]
    # Even a refused request tells an allowed page why.
    refused = requests.get(f"{url}/info/", headers={"Origin": LAB_ORIGIN}, timeout=30)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == LAB_ORIGIN


@pytest.fixture(scope="module")
def recording_pacs():
    """A stand-in DICOMweb server that answers every request with an empty JSON list and records it."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append({"method": self.command, "path": self.path,
                         "headers": {name.lower(): value for name, value in self.headers.items()},
                         "body": self.rfile.read(length)})
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            self.wfile.write(b"[]")

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    pacs = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=pacs.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{pacs.server_port}", seen
    pacs.shutdown()


def test_the_dicomweb_proxy_keeps_the_token_and_stays_under_the_studies_url(recording_pacs, tmp_path):
    pacs, seen = recording_pacs
    token = add_account(tmp_path / "tokens.json", "alice", "annotator")
    conf = [("auth_tokens", tmp_path / "tokens.json"), ("dicomweb_cache", tmp_path / "cache")]
    with running_server(f"{pacs}/dicom-web", conf, tmp_path, headers=bearer(token)) as url:
        seen.clear()
        headers = {**bearer(token), "Accept": "application/dicom+json", "Cookie": "session=secret"}
        response = requests.get(f"{url}/proxy/dicom/qido/studies", params={"PatientID": "P1", "limit": 5},
                                headers=headers, timeout=30)
        assert response.status_code == 200 and response.json() == []
        stow = requests.post(f"{url}/proxy/dicom/studies", data=b"--b--", timeout=30, headers={
            **bearer(token), "Content-Type": "multipart/related; type=application/dicom; boundary=b"})
        assert stow.status_code == 200
        for path in ("%2E%2E/tools/shutdown", "studies/%2E%2E/%2E%2E/tools/reset"):
            assert requests.post(f"{url}/proxy/dicom/{path}", headers=bearer(token), timeout=30).status_code == 422
        assert requests.get(f"{url}/proxy/dicom/qido/studies", timeout=30).status_code == 401
    assert [(r["method"], r["path"]) for r in seen] == [("GET", "/dicom-web/studies?PatientID=P1&limit=5"),
                                                        ("POST", "/dicom-web/studies")]
    for request in seen:
        assert "authorization" not in request["headers"] and "cookie" not in request["headers"], request["headers"]
    assert seen[0]["headers"]["accept"] == "application/dicom+json" and seen[1]["body"] == b"--b--"

