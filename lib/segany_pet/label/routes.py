"""MONAI Label's routes as this app serves them: every name a client sends checked before a file is touched,
bad input a 4xx that says what to fix, no temporary file left behind; training and scoring requests checked
before a job starts, training stopped cleanly, leased strategies served in one datastore transaction."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

from fastapi import FastAPI, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import file_checksum

from segany_pet.errors import CheckpointError, MalformedRequestError, UserInputError
from segany_pet.label.datastore import LABEL_VALUES, SAFE_NAME, image_extension
from segany_pet.model import load_checkpoint
from segany_pet.pet import load_nifti

logger = logging.getLogger(__name__)


def replace_route(app: FastAPI, router, endpoint, replacement) -> bool:
    """Serve ``replacement`` (given ``endpoint``'s signature) in place of MONAI Label's route to ``endpoint``.

    The new route goes first in the app's routes, so it matches before the router MONAI Label included
    (FastAPI resolves included routers lazily: their routes are not in ``app.router.routes``).
    """
    from monailabel.config import settings

    found = [route for route in router.routes if isinstance(route, APIRoute) and route.endpoint is endpoint]
    if not found:
        logger.warning("MONAI Label's route to %s was not found; it is served unchanged", endpoint.__qualname__)
        return False
    signature = inspect.signature(endpoint)
    if "http_request" in inspect.signature(replacement).parameters:  # the replacement also reads the request
        extra = inspect.Parameter("http_request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        signature = signature.replace(parameters=[*signature.parameters.values(), extra])
    replacement.__signature__ = signature
    for route in found:  # a deprecated path to the same endpoint too (PUT /datastore/ beside /datastore/image)
        add_route_first(app, settings.MONAI_LABEL_API_STR + route.path, replacement, methods=list(route.methods),
                        summary=route.summary, tags=route.tags, responses=route.responses, name=route.name,
                        include_in_schema=route.include_in_schema, deprecated=route.deprecated)
    return True


def add_route_first(app: FastAPI, path: str, endpoint, **options) -> None:
    """A route that matches before MONAI Label's (see `replace_route`)."""
    app.router.add_api_route(path, endpoint, **options)
    app.router.routes.insert(0, app.router.routes.pop())


def check_and_stop_training(app: FastAPI, trainers: dict, datastore, stop_grace_seconds: float = 60.0) -> None:
    """Make MONAI Label's training routes answer like the rest of the project.

    - ``POST /train/{model}`` checks the options and that the datastore holds labels before it starts a
      subprocess, so a mistake is a 4xx now rather than a failed job to discover later in ``GET /train/``;
    - ``DELETE /train/`` asks the running job to save and stop (``request_stop``) and waits up to
      ``stop_grace_seconds`` for it to exit, instead of killing it mid-write; it kills only a job that does
      not stop in time. The stopped job continues from its checkpoint on the next POST.
    """
    from monailabel.endpoints import train as train_endpoint
    from monailabel.utils.async_tasks import utils as async_tasks

    def run_model(model, params, run_sync, enqueue, user):
        task = trainers.get(model)
        if task is None:
            raise HTTPException(status_code=404, detail=f"training task {model!r} is unknown; the tasks are "
                                                        f"{sorted(trainers)}")
        task.check_request({**(params or {}), "model": model}, datastore)
        task.clear_stop_request()
        return train_endpoint.run_model(model, params, run_sync, enqueue)

    def stop(user):
        running = dict(async_tasks.background_processes.get("train") or {})
        if not running:
            return train_endpoint.stop()
        for task in trainers.values():
            task.request_stop()
        for job in async_tasks.background_tasks.get("train", []):
            if job["id"] in running:
                job["status"] = "STOPPED"  # MONAI Label would record DONE for the clean exit
        deadline = time.monotonic() + stop_grace_seconds
        while time.monotonic() < deadline and any(p.poll() is None for p in running.values()):
            time.sleep(0.2)
        if any(p.poll() is None for p in running.values()):
            logger.warning("training did not stop within %.0f s of the request; killing it", stop_grace_seconds)
            return train_endpoint.stop()
        jobs = [job for job in async_tasks.background_tasks.get("train", []) if job["id"] in running]
        for job in jobs:
            job.setdefault("end_ts", time.strftime("%Y-%m-%d %H:%M:%S"))
        return jobs[-1] if jobs else None

    replace_route(app, train_endpoint.router, train_endpoint.api_run_model, run_model)
    replace_route(app, train_endpoint.router, train_endpoint.api_stop, stop)


def serve_leased_strategies(app: FastAPI, instance, strategies: dict, leased: set[str], prewarmer=None) -> None:
    """``POST /activelearning/{strategy}`` for the strategies in ``leased`` without MONAI Label's extra writes.

    MONAI Label records every served sample by rewriting the image's info after the strategy ran: a second
    datastore write per request (and a window in which two clients get the same scan). The leased strategies
    choose and record in one transaction (PETDatastore.lease_best), so their answer skips that write; other
    strategies are served by MONAI Label unchanged; an unknown one is a 404. With a ``prewarmer``
    (`segany_pet.label.prewarm.Prewarmer`), the scan served starts warming for its annotator's clicks.
    """
    from monailabel.endpoints import activelearning as endpoint

    def next_sample(strategy, params, user):
        if strategy not in strategies:
            raise HTTPException(status_code=404, detail=f"strategy {strategy!r} is unknown; the strategies are "
                                                        f"{sorted(strategies)}")
        if strategy not in leased:
            result = endpoint.sample(strategy, params, user.username)
        else:
            request = {"strategy": strategy, **(params or {})}
            request["client_id"] = request.get("client_id") or user.username  # MONAILabelClient sends null
            result = instance.next_sample(request)
            result = {**instance.datastore().get_image_info(result["id"]), **result} if result else {}
        if prewarmer is not None and isinstance(result, dict) and result.get("path"):
            prewarmer.scan_served(result["path"])
        return result

    replace_route(app, endpoint.router, endpoint.api_sample, next_sample)


def check_scoring_requests(app: FastAPI, methods: dict, datastore) -> None:
    """``POST /scoring/{method}`` checks its method and params first (a 4xx now, not a failed job to find later)."""
    from monailabel.endpoints import scoring as endpoint

    def run_method(method, params, run_sync, user):
        task = methods.get(method)
        if task is None:
            raise HTTPException(status_code=404, detail=f"scoring method {method!r} is unknown; the methods are "
                                                        f"{sorted(methods)}")
        if hasattr(task, "check_request"):
            task.check_request(params or {}, datastore)
        return endpoint.run_method(method, params, run_sync)

    replace_route(app, endpoint.router, endpoint.api_run_method, run_method)



# ----------------------------------------------------------------------------------------------------------
# Uploads and params

SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # MONAI Label's uuid1
MAX_SESSION_EXPIRY_S = 7 * 24 * 3600
CHECKPOINT_EXTENSIONS = (".pt", ".pth")


@contextlib.contextmanager
def uploaded(upload: UploadFile, suffix: str) -> Iterator[str]:
    """An upload as a temporary file ending in ``suffix``, removed however the request ends: a rejected upload
    leaves nothing behind."""
    name = os.path.basename(upload.filename or "")
    if not (SAFE_NAME.fullmatch(name) and ".." not in name and name.lower().endswith(suffix)):
        name = f"upload{suffix}"
    folder = tempfile.mkdtemp(prefix="segany_pet_upload_")
    try:
        path = os.path.join(folder, name)  # the client's own name where safe: error messages then use it
        with open(path, "wb") as file:
            shutil.copyfileobj(upload.file, file, 1 << 20)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def json_object(text: str | None, what: str) -> dict:
    """A form field that must hold a JSON object (empty: {}); UserInputError says what to send instead."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedRequestError(f"{what} must be a JSON object such as {{\"key\": \"value\"}}; it could not be "
                                    f"parsed: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{what} must be a JSON object such as {{\"key\": \"value\"}}, not a JSON "
                             f"{type(value).__name__}")
    return value


def checked_session_id(session_id: str) -> str:
    if not SESSION_ID.fullmatch(session_id or ""):
        raise UserInputError(f"session id {session_id!r} is not one this server gives out (PUT /session/ answers "
                             "with its session_id)")
    return session_id


def label_suffix(filename: str | None) -> str:
    """OHIF's ``label.bin`` (the image's voxels as uint8) or a NIfTI label."""
    return ".bin" if (filename or "").lower().endswith(".bin") else image_extension(filename or "label.nii.gz")


# ----------------------------------------------------------------------------------------------------------
# The datastore, sessions, models and logs

def serve_confined_datastore(app: FastAPI, instance, accepts_images: bool, prewarmer=None) -> None:
    """MONAI Label's datastore writes with every name checked and every upload checked and removed.

    Names go through the datastore's `checked_name`, images through `load_nifti`'s PET checks, labels through
    `check_label_file` with the app's LABEL_VALUES (the datastore does both); an unknown id is a 404.
    ``accepts_images``: False for a DICOMweb datastore, whose images come from the PACS. The dataset export
    streams its archive from a file already unlinked, so no request leaves it behind. With a ``prewarmer``, an
    image download (how Slicer opens a scan) starts warming the scan for its clicks.
    """
    from monailabel.endpoints import datastore as endpoint

    def download_image(image, user):
        reply = endpoint.download_image(image)
        if prewarmer is not None and isinstance(reply, FileResponse):
            prewarmer.scan_served(reply.path)
        return reply

    def add_image(background_tasks, image, params, file, user):
        if not accepts_images:
            raise HTTPException(status_code=405, detail="this server's images come from its DICOMweb PACS: "
                                                        "store new PET series there")
        extension = image_extension(file.filename or "")
        image_id = image or os.path.basename(file.filename)[: -len(extension)]
        info = {**json_object(params, "params"), "user": user.username}
        with uploaded(file, extension) as path:
            return {"image": instance.datastore().add_image(image_id, path, info)}

    def remove_image(id, user):
        instance.datastore().remove_image(id)
        return {}

    def save_label(background_tasks, image, params, tag, label, user):
        info = json_object(params, "params")
        with uploaded(label, label_suffix(label.filename)) as path:
            label_id = instance.datastore().save_label(image, path, tag or DefaultLabelTag.FINAL.value, info,
                                                       label_values=LABEL_VALUES)
        return {**(instance.on_save_label(image, label_id) or {}), "image": image, "label": label_id}

    def remove_label(id, tag, user):
        instance.datastore().remove_label(id, tag)
        return {}

    def update_image_info(image, info, user):
        instance.datastore().update_image_info(image, {**json_object(info, "info"), "user": user.username})
        return {}

    def update_label_info(label, tag, info, user):
        instance.datastore().update_label_info(label, tag, {**json_object(info, "info"), "user": user.username})
        return {}

    def update_label_info_deprecated(label, tag, params, user):
        return update_label_info(label, tag, params, user)

    def download_dataset(limit_cases, user):
        if limit_cases is not None and limit_cases < 1:
            raise UserInputError(f"limit_cases must be at least 1, not {limit_cases}")
        datastore = instance.datastore()
        if not datastore.datalist():
            raise HTTPException(status_code=404, detail="no labeled image to export: save a final label first")
        path = datastore.get_dataset_archive(limit_cases)
        archive = open(path, "rb")  # noqa: SIM115 (closed by the stream)
        size = os.fstat(archive.fileno()).st_size
        os.unlink(path)  # the open file keeps the data until the stream ends, however it ends

        def blocks():
            with archive:
                while block := archive.read(1 << 20):
                    yield block

        return StreamingResponse(blocks(), media_type="application/zip", headers={
            "Content-Disposition": 'attachment; filename="dataset.zip"', "Content-Length": str(size)})

    for original, replacement in [
        (endpoint.api_add_image, add_image), (endpoint.api_remove_image, remove_image),
        (endpoint.api_save_label, save_label), (endpoint.api_remove_label, remove_label),
        (endpoint.api_put_image_info, update_image_info), (endpoint.api_put_label_info, update_label_info),
        (endpoint.api_update_label_info, update_label_info_deprecated),
        (endpoint.api_download_dataset, download_dataset), (endpoint.api_download_image, download_image),
    ]:
        replace_route(app, endpoint.router, original, replacement)


def serve_checked_sessions(app: FastAPI) -> None:
    """MONAI Label's sessions (Slicer's upload of a scan that is not in the datastore) with checked ids (a
    session id names a folder that DELETE removes) and one NIfTI SUV image each, checked as the infer path
    checks it; no archives to unpack."""
    from monailabel.endpoints import session as endpoint

    def get_session(session_id, update_ts, image, user):
        return endpoint.get_session(checked_session_id(session_id), update_ts, image)

    def remove_session(session_id, user):
        return endpoint.remove_session(checked_session_id(session_id))

    def create_session(background_tasks, uncompress, expiry, files, user):
        from monailabel.interfaces.utils.app import app_instance

        if uncompress:
            raise UserInputError("uncompress is not supported: send the scan as one NIfTI SUV image")
        if len(files) != 1:
            raise UserInputError(f"a session holds one NIfTI SUV image; {len(files)} files were sent")
        if not 0 <= expiry <= MAX_SESSION_EXPIRY_S:
            raise UserInputError(f"expiry must be 0 (the server's default) to {MAX_SESSION_EXPIRY_S} s, not {expiry}")
        sessions = app_instance().sessions()
        if sessions is None:
            raise HTTPException(status_code=406, detail="sessions are off on this server")
        with uploaded(files[0], image_extension(files[0].filename or "")) as path:
            load_nifti(path)
            session_id, info = sessions.add_session(path, expiry, False)  # moves the file into the session
        return {"session_id": session_id, "session_info": info.to_json()}

    replace_route(app, endpoint.router, endpoint.api_get_session, get_session)
    replace_route(app, endpoint.router, endpoint.api_remove_session, remove_session)
    replace_route(app, endpoint.router, endpoint.api_create_session, create_session)


def serve_model_files(app: FastAPI, served: dict) -> None:
    """``/model/{model}`` for the served models (``served``: name -> ServedModel): download, info, and for an
    admin an upload, checked as a checkpoint before it is published (served from the next click on), or the
    deletion of the published model (the configured one is served again)."""
    from monailabel.endpoints import model as endpoint

    def known(model: str):
        if model not in served:
            raise HTTPException(status_code=404, detail=f"model {model!r} is unknown; the models are {sorted(served)}")
        return served[model]

    def download(model, user):
        path = known(model).current_path()
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    def info(model, user):
        model_served = known(model)
        stat = model_served.current_path().stat()
        return {"checksum": file_checksum(str(model_served.current_path())), "modified_time": int(stat.st_mtime),
                **model_served.describe()}

    def upload(background_tasks, model, file, user):
        model_served = known(model)
        extension = os.path.splitext(file.filename or "")[1].lower()
        if extension not in CHECKPOINT_EXTENSIONS:
            raise UserInputError(f"upload {file.filename!r} is not a checkpoint: send a "
                                 f"{' or '.join(CHECKPOINT_EXTENSIONS)} file (own, SAM-Med3D or SegAnyPET)")
        with uploaded(file, extension) as path:
            try:
                load_checkpoint(path)
            except CheckpointError as exc:
                raise UserInputError(f"the upload is not a usable checkpoint: {exc}") from None
            model_served.publish(path)
        return info(model, user)

    def delete(model, user):
        model_served = known(model)
        if not model_served.unpublish():
            raise HTTPException(status_code=404, detail=f"no published model to delete: {model} serves its configured "
                                                        f"file {model_served.path.name} (chosen with --conf model)")
        return {}

    replace_route(app, endpoint.router, endpoint.api_download_model, download)
    replace_route(app, endpoint.router, endpoint.api_model_info, info)
    replace_route(app, endpoint.router, endpoint.api_update_model, upload)
    replace_route(app, endpoint.router, endpoint.api_delete_model, delete)


def serve_checked_logs(app: FastAPI) -> None:
    """``GET /logs/gpu`` answers a 404 on a machine without an NVIDIA GPU instead of failing."""
    from monailabel.endpoints import logs as endpoint

    def gpu_info(user):
        if shutil.which("nvidia-smi") is None:
            raise HTTPException(status_code=404, detail="this server has no NVIDIA GPU (nvidia-smi is not installed)")
        done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        return Response(content=done.stdout or done.stderr, media_type="text/plain")

    replace_route(app, endpoint.router, endpoint.gpu_info, gpu_info)


def drop_unserved_routers(app: FastAPI) -> None:
    """MONAI Label's pathology (WSI) and batch inference routes: no task of this app answers them."""
    from monailabel.endpoints import batch_infer, wsi_infer

    unserved = (batch_infer.router, wsi_infer.router)
    app.router.routes = [route for route in app.router.routes
                         if getattr(route, "original_router", None) not in unserved]


def refuse_run_all(app: FastAPI, trainers: dict, methods: dict) -> None:
    """MONAI Label's ``POST /train/`` and ``POST /scoring/`` (every task at once, unchecked): a 405 that names the
    tasks, each of which is checked when asked for by name."""
    from monailabel.endpoints import scoring, train

    def run_all_training(params, run_sync, user):
        raise HTTPException(status_code=405, headers={"Allow": "GET, DELETE"},
                            detail=f"name the training task: POST /train/<task>, one of {sorted(trainers)}")

    def run_all_scoring(params, run_sync, user):
        raise HTTPException(status_code=405, headers={"Allow": "GET, DELETE"},
                            detail=f"name the scoring method: POST /scoring/<method>, one of {sorted(methods)}")

    replace_route(app, train.router, train.api_run, run_all_training)
    replace_route(app, scoring.router, scoring.api_run, run_all_scoring)


# Query and path fields that carry a name (checked_name, session ids): documented with their pattern. The
# pattern is stricter than the check (no two separators in a row): generated examples then always pass it.
NAME_FIELDS = ("image", "id", "label", "tag")
DOCUMENTED_NAME = r"^[A-Za-z0-9]+([._+-][A-Za-z0-9]+)*$"
ERROR_STATUSES = {"400": "Malformed request", "401": "Sign-in needed", "403": "The role does not allow this",
                  "404": "Not found", "405": "Not supported here", "409": "Conflict", "413": "Request too large",
                  "422": "Invalid input: the detail says what to fix"}
FILE_REPLIES = ("/datastore/image", "/datastore/label", "/datastore/dataset", "/model/{model}", "/logs/",
                "/logs/gpu", "/session/{session_id}", "/infer/{model}")


def document_errors(app: FastAPI) -> None:
    """The OpenAPI schema as the app answers: every operation may answer the 4xx of ERROR_STATUSES with
    ``{"detail": ...}`` (a message, or FastAPI's list of field errors), name fields carry their pattern, and the
    routes that send files say so."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = {
                "type": "object", "properties": {"detail": {"title": "Detail"}}, "required": ["detail"]}
            problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    for status, description in ERROR_STATUSES.items():
                        responses[status] = {"description": description, "content": problem}
                    if path in FILE_REPLIES and "200" in responses:
                        responses["200"].setdefault("content", {})["*/*"] = {"schema": {}}
                    for parameter in operation.get("parameters", []):
                        name, field = parameter["name"], parameter.get("schema", {})
                        text = field.get("type") == "string" or {"type": "string"} in field.get("anyOf", [])
                        if parameter["in"] in ("query", "path") and name in NAME_FIELDS and text:
                            parameter["schema"] = {"type": "string", "pattern": DOCUMENTED_NAME, "maxLength": 200}
                        if name == "session_id":
                            parameter["schema"] = {"type": "string", "pattern": f"^{SESSION_ID.pattern}$"}
                        if name == "limit_cases":
                            parameter["schema"] = {"type": "integer", "minimum": 1}
            # The infer tasks take no label upload (the server answers 422): not offered.
            for body_schema in schema["components"]["schemas"].values():
                if body_schema.get("title", "").startswith("Body_api_run_inference"):
                    body_schema.get("properties", {}).pop("label", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi_schema = None
    app.openapi = openapi
