"""Server glue for the click path: project errors become 4xx answers that tell the client what to fix; infer runs
off the event loop, its replies encoded by `segany_pet.label.replies`; the bundled OHIF gets its add-ons (a Save
label button, labels sent as the mask's box, sign-in)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from segany_pet.errors import UnknownImageError, UserInputError
from segany_pet.label.datastore import checked_name, image_extension
from segany_pet.label.infer import flag, result_format
from segany_pet.label.replies import LABEL_BOX_HEADER, disposition, label_response, multipart_reply
from segany_pet.label.routes import add_route_first, checked_session_id, json_object, replace_route, uploaded

logger = logging.getLogger(__name__)

async def _user_input_error(request: Request, exc: UserInputError) -> JSONResponse:
    logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc)
    return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})


async def _params_not_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    message = (
        f"params must be a JSON object such as {{\"foreground\": [[40, 31, 10]]}}; "
        f"it could not be parsed: {exc.msg} at character {exc.pos}"
    )
    logger.warning("%s %s -> 400: %s", request.method, request.url.path, message)
    return JSONResponse(status_code=400, content={"detail": message})


async def _monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse(status_code=status, content={"detail": exc.msg})


def install_error_handlers(app: FastAPI) -> None:
    """Map project errors to HTTP answers on MONAI Label's FastAPI app.

    MONAI Label creates our app inside its lifespan, after Starlette has built its middleware
    stack; clearing the stack makes the next request rebuild it with these handlers.
    """
    app.add_exception_handler(UserInputError, _user_input_error)
    app.add_exception_handler(json.JSONDecodeError, _params_not_json)
    app.add_exception_handler(MONAILabelException, _monailabel_error)
    app.middleware_stack = None


# Scripts served after the bundled OHIF's app-config.js, which OHIF loads first on every page: add-ons that
# need no rebuilt viewer. Sign-in where the server has it on (its token on each request to this server), a "Save
# label" button storing the MONAI Label panel's segmentation as the series' final label (OHIF's MONAI Label mode
# has none), and the panel's labels sent as the mask's box.
OHIF_ADDONS = ("ohif_sign_in.js", "ohif_save_label.js", "ohif_label_box.js")


def add_ohif_addons(app: FastAPI) -> None:
    """Serve the bundled OHIF's ``app-config.js`` with the ``OHIF_ADDONS`` after it."""
    from monailabel.config import settings
    from monailabel.endpoints import ohif

    app_config = Path(ohif.__file__).parent / "static" / "ohif" / "app-config.js"
    if not app_config.exists():
        logger.warning("%s not found: OHIF is served without the project's add-ons", app_config)
        return

    def app_config_with_addons():
        scripts = [app_config, *(Path(__file__).with_name(name) for name in OHIF_ADDONS)]
        script = "\n".join(path.read_text(encoding="utf-8") for path in scripts)
        return Response(content=script, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

    add_route_first(app, settings.MONAI_LABEL_API_STR + "/ohif/app-config.js", app_config_with_addons,
                    methods=["GET"], include_in_schema=False)


def infer_stored_image(background_tasks, model: str, image: str, params: dict, output, nrrd_tasks: Mapping):
    """MONAI Label's ``run_inference`` for the common request (a stored image and params, nothing uploaded),
    without the ``instance.info()`` it makes on every request: that builds the whole /info (GET /info/ takes
    15 ms at 6,000 scans) to read a ``config`` key MONAI Label's info never has.

    An uncompressed ``.nrrd`` label from a task in ``nrrd_tasks`` (what OHIF asks for, with ``output=image``;
    Python clients may ask for it with the reply params too) comes from memory (its ``nrrd_reply``) as
    ``(parts, media type, headers)``, not through a result file: writing an autoPET-sized label and reading it
    back cost 0.12 s a click (py-spy over scripts/benchmark_server.py). With ``label_box: true`` such a file
    sent alone (output=image) holds the header and the voxels of the mask's box, and the ``X-Label-Box``
    header says where the box sits (`segany_pet.pet.mask_nrrd_box`; the bundled OHIF's add-on asks for it)."""
    from monailabel.endpoints import infer as infer_endpoint
    from monailabel.interfaces.utils.app import app_instance

    instance = app_instance()
    request = {"model": model, "image": image, **params}
    logger.info("Infer Request: %s", request)
    task = nrrd_tasks.get(model)
    from_memory = task is not None and output in (None, "image", "all") \
        and result_format(request) == (".nrrd", False) and not request.get("save_label")
    # A preference, as Accept-Encoding is: honoured where the label file alone comes from memory, and said so
    # by the reply's X-Label-Box header; elsewhere the whole file comes as asked.
    label_box = flag(request, "label_box", default=False)
    if from_memory:
        request["image"] = instance.datastore().get_image_uri(image)
        parts, reply, box = task.nrrd_reply(request, label_box and output == "image")
        filename = f"{model}_label.nrrd"
        if output == "image":
            headers = disposition(filename)
            if box is not None:  # readable by a page of another origin too (OHIF served elsewhere)
                headers |= {LABEL_BOX_HEADER: box, "Access-Control-Expose-Headers": LABEL_BOX_HEADER}
            return parts, "application/octet-stream", headers
        parts, media_type = multipart_reply(reply, filename, parts)
        return parts, media_type, {}
    result = instance.infer(request)
    if result is None:
        raise HTTPException(status_code=500, detail="Failed to execute infer")
    return infer_endpoint.send_response(instance.datastore(), result, output, background_tasks)


# Request keys the server sets itself: from params they would name a file to read. ("label" stays: Slicer sends
# the label's name there, and no task of this app reads it as a file.)
RESERVED_INFER_PARAMS = ("image", "model", "session")


def checked_infer_params(params: str | None) -> dict:
    """An infer request's ``params``: a JSON object that does not set what the server sets, with MONAI Label's
    own keys (``timeout``, ``save_label``) of the right type."""
    request = json_object(params, "params")
    reserved = [key for key in RESERVED_INFER_PARAMS if key in request]
    if reserved:
        raise UserInputError(f"params may not set {', '.join(reserved)}: name the scan with the image field (an "
                             "image id) or upload it as file")
    timeout = request.get("timeout", 1)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise UserInputError(f"timeout must be a number of seconds from 0 to 3600, not {timeout!r}")
    flag(request, "save_label", default=False)
    return request


def known_image(image: str) -> None:
    """A 404 unless ``image`` is a valid id of the datastore (a 422 for a name that is no id: a path, say)."""
    from monailabel.interfaces.utils.app import app_instance

    if not app_instance().datastore().get_image_uri(checked_name(image, "image id")):
        raise UnknownImageError(f"image {image!r} is not in the datastore; GET /datastore/?output=all lists the "
                                "image ids")


def infer_upload(background_tasks, model: str, file, request: dict, output):
    """Infer on an uploaded scan, which is checked as a stored one is (`load_nifti`) and removed however the
    request ends."""
    from monailabel.endpoints import infer as infer_endpoint
    from monailabel.interfaces.utils.app import app_instance

    instance = app_instance()
    if output == "dicom_seg":
        raise UserInputError("output=dicom_seg needs a series of the DICOMweb datastore, not an upload")
    with uploaded(file, image_extension(file.filename or "")) as path:
        result = instance.infer({**request, "model": model, "image": path})
        return infer_endpoint.send_response(instance.datastore(), result, output, background_tasks)


def serve_infer_off_the_event_loop(app: FastAPI, nrrd_tasks: Mapping | None = None) -> None:
    """Run ``POST /infer/{model}`` in FastAPI's worker threads instead of on the event loop.

    MONAI Label declares its infer endpoint ``async`` but computes synchronously inside it, which
    stalls every other request (``/info``, other annotators) while a model runs. A plain function with
    the same signature makes FastAPI run it in its thread pool; the work is MONAI Label's own
    (`infer_stored_image` for a click on a stored image, with OHIF's label from memory for ``nrrd_tasks``).

    A label file (``output=image``) is sent from memory instead of streamed by ``FileResponse``, whose 64 kB
    chunks each cross a thread: ~0.02 s on a 4 mm whole-body reply (scripts/benchmark_server.py); and large
    replies go compressed (zstd or deflate) to clients that accept it (`label_response`).
    """
    from monailabel.endpoints import infer as infer_endpoint

    nrrd_tasks = dict(nrrd_tasks or {})

    def run_inference_in_worker_thread(background_tasks, model, image, session_id, params, file, label, output, user,
                                       http_request):
        request = checked_infer_params(params)
        if label:
            raise UserInputError("this app's infer tasks take no label upload: send clicks or a box in params")
        if file:
            reply = infer_upload(background_tasks, model, file, request, output)
        elif session_id:
            reply = infer_endpoint.run_inference(background_tasks, model, "", checked_session_id(session_id),
                                                 json.dumps(request), None, None, output)
        elif image:
            known_image(image)
            if output == "dicom_seg":
                reply = infer_endpoint.run_inference(background_tasks, model, image, "", json.dumps(request), None,
                                                     None, output)
            else:
                reply = infer_stored_image(background_tasks, model, image, request, output, nrrd_tasks)
        else:
            raise UserInputError("say which scan to segment: an image id (image=...), an uploaded NIfTI SUV image "
                                 "(file) or a session_id")
        if isinstance(reply, tuple):
            parts, media_type, headers = reply
            return label_response(parts, http_request, media_type=media_type, headers=headers)
        if isinstance(reply, FileResponse):
            with open(reply.path, "rb") as result:
                content = result.read()  # MONAI Label's background task removes the file after the reply
            return label_response([content], http_request, media_type=reply.media_type,
                                  headers=disposition(Path(reply.path).name))
        if isinstance(reply, Response) and "content-encoding" not in reply.headers:
            return label_response([reply.body], http_request, media_type=reply.media_type, headers={})
        return reply

    replace_route(app, infer_endpoint.router, infer_endpoint.api_run_inference, run_inference_in_worker_thread)
