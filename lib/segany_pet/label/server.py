"""Server glue: project errors become 4xx answers that tell the client what to fix."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
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
