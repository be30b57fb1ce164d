"""Server glue: project errors become 4xx answers that tell the client what to fix; infer runs off the event loop."""

from __future__ import annotations

import inspect
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from segany_pet.errors import UserInputError

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


def serve_infer_off_the_event_loop(app: FastAPI) -> None:
    """Run ``POST /infer/{model}`` in FastAPI's worker threads instead of on the event loop.

    MONAI Label declares its infer endpoint ``async`` but computes synchronously inside it, which
    stalls every other request (``/info``, other annotators) while a model runs. A plain function with
    the same signature makes FastAPI run it in its thread pool; the work is MONAI Label's own.
    """
    from monailabel.endpoints import infer as infer_endpoint

    found = [
        (index, route)
        for index, route in enumerate(app.router.routes)
        if isinstance(route, APIRoute) and route.endpoint is infer_endpoint.api_run_inference
    ]
    if not found:
        logger.warning("MONAI Label's infer route was not found; inference runs on the event loop")
        return
    index, route = found[0]

    def run_inference_in_worker_thread(background_tasks, model, image, session_id, params, file, label, output, user):
        return infer_endpoint.run_inference(background_tasks, model, image, session_id, params, file, label, output)

    run_inference_in_worker_thread.__signature__ = inspect.signature(route.endpoint)
    app.router.routes[index] = APIRoute(
        route.path,
        run_inference_in_worker_thread,
        methods=list(route.methods),
        summary=route.summary,
        tags=route.tags,
        responses=route.responses,
        name=route.name,
    )
