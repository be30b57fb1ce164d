"""Who may do what, from where: sign-in with bearer tokens, two roles, allowed origins and request sizes.

A lab turns sign-in on with one setting, ``--conf auth_tokens FILE``: a JSON file of accounts, each a name, a
role and the SHA-256 of its token (``segany-pet token add NAME --role annotator --file FILE`` writes one and
prints the token once). Every request then needs ``Authorization: Bearer <token>``, and each route needs a
role (`required_role`): annotators infer, fetch images and labels and save labels; admins also upload and
delete, train, score, replace the model and read logs. What is not listed needs an admin. The viewer's own
files and MONAI Label's sign-in handshake (``GET /auth/``, ``POST /auth/token``, what Slicer's module and
MONAILabelClient call) stay open. The file is re-read when it changes, so removing an account takes effect
without a restart.

Without the setting every request is served as MONAI Label's default admin user: the single-user demo on
127.0.0.1. `warn_if_exposed` logs loudly when such a server listens on another address.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware

from segany_pet.errors import UserInputError

logger = logging.getLogger(__name__)

ANNOTATOR = "annotator"
ADMIN = "admin"
ROLES = (ANNOTATOR, ADMIN)  # each role may do what the ones before it may
PUBLIC = None
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_REQUEST_MB = 2048  # an autoPET-sized SUV image is 208 MB uncompressed; a long-axial-FOV scan several times

# (methods, path pattern, role): the first match decides; no match needs an admin.
ROUTE_ROLES = (
    # The viewer's code and MONAI Label's sign-in handshake: no patient data, and a client has no token yet.
    ({"GET", "HEAD"}, r"/ohif(/.*)?|/static/.*|/favicon\.ico", PUBLIC),
    ({"GET"}, r"/auth/", PUBLIC),
    ({"POST"}, r"/auth/token", PUBLIC),
    ({"GET"}, r"/auth/token/valid|/info/|/|/docs|/openapi\.json", ANNOTATOR),
    ({"POST"}, r"/infer/[^/]+|/activelearning/[^/]+", ANNOTATOR),
    ({"GET", "HEAD"}, r"/datastore/(image|image/info|label|label/info)?", ANNOTATOR),
    ({"PUT"}, r"/datastore/(label|label/info|updatelabelinfo)", ANNOTATOR),
    ({"GET"}, r"/train/|/scoring/", ANNOTATOR),  # job status
    ({"GET", "POST"}, r"/proxy/dicom/.*", ANNOTATOR),  # OHIF's studies, and its DICOM-SEG saved to the PACS
    ({"GET", "PUT", "DELETE"}, r"/session/.*", ANNOTATOR),  # Slicer's upload of an image not in the datastore
)
_COMPILED_ROLES = tuple((methods, re.compile(pattern), role) for methods, pattern, role in ROUTE_ROLES)


def required_role(method: str, path: str) -> str | None:
    """The role a request needs (PUBLIC: none), by ROUTE_ROLES."""
    for methods, pattern, role in _COMPILED_ROLES:
        if method in methods and pattern.fullmatch(path):
            return role
    return ADMIN


def allows(role: str, needed: str | None) -> bool:
    return needed is PUBLIC or ROLES.index(role) >= ROLES.index(needed)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Account:
    name: str
    role: str


class TokenFile:
    """The accounts of an ``auth_tokens`` file, re-read when the file changes.

    Format: ``{"accounts": {"<name>": {"role": "annotator" | "admin", "sha256": "<hex digest of the token>"}}}``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = None
        self._by_digest: dict[str, Account] = {}
        self._reload()

    def account(self, token: str) -> Account | None:
        """The account of a token, or None. Looked up by digest: the file holds no token itself."""
        with self._lock:
            try:
                self._reload()
            except UserInputError:
                logger.exception("%s became unreadable; the accounts read before stay in force", self.path)
            return self._by_digest.get(token_digest(token))

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise UserInputError(f"auth_tokens file {self.path} cannot be read ({exc})") from exc
        if (stat.st_mtime_ns, stat.st_size) == self._stamp:
            return
        self._by_digest = {digest: Account(name, role) for name, (role, digest) in read_accounts(self.path).items()}
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        logger.info("sign-in on: %d account(s) from %s", len(self._by_digest), self.path)


def read_accounts(path: Path) -> dict[str, tuple[str, str]]:
    """{name: (role, token digest)} of an auth_tokens file (empty when it does not exist); UserInputError when it
    is malformed."""
    if not path.exists():
        return {}
    try:
        accounts = json.loads(path.read_text())["accounts"]
        parsed = {name: (entry["role"], entry["sha256"]) for name, entry in accounts.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserInputError(f"{path} is not an auth_tokens file ({exc!r}): expected "
                             '{"accounts": {"<name>": {"role": "annotator", "sha256": "<hex>"}}}') from exc
    for name, (role, digest) in parsed.items():
        if role not in ROLES or not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise UserInputError(f"{path}: account {name!r} needs a role in {ROLES} and a 64-digit hex sha256")
    return parsed


def add_account(path: str | os.PathLike, name: str, role: str) -> str:
    """Add (or give a new token to) an account; returns the new token, which is stored only as its digest."""
    if role not in ROLES:
        raise UserInputError(f"role {role!r} is unknown; choose one of {ROLES}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
        raise UserInputError(f"account name {name!r}: use letters, digits and . _ @ - (up to 64)")
    path = Path(path)
    accounts = read_accounts(path)
    token = secrets.token_urlsafe(32)
    accounts[name] = (role, token_digest(token))
    _write_accounts(path, accounts)
    return token


def remove_account(path: str | os.PathLike, name: str) -> bool:
    path = Path(path)
    accounts = read_accounts(path)
    if accounts.pop(name, None) is None:
        return False
    _write_accounts(path, accounts)
    return True


def _write_accounts(path: Path, accounts: dict[str, tuple[str, str]]) -> None:
    content = {"accounts": {name: {"role": role, "sha256": digest} for name, (role, digest) in accounts.items()}}
    partial = path.with_name(f".{path.name}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # digests only, yet nobody's business
    with os.fdopen(descriptor, "w") as file:
        json.dump(content, file, indent=1)
    os.replace(partial, path)


def bearer_token(headers: dict[bytes, bytes]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (ASGI header names and values)."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class AccessControl:
    """ASGI middleware: the sign-in and role check of each request (with ``tokens``) and the bound on its body.

    The account goes into the request's scope (``segany_pet.account``), where `current_user` finds it for MONAI
    Label's endpoints.
    """

    def __init__(self, app, tokens: TokenFile | None, max_request_bytes: int):
        self.app = app
        self.tokens = tokens
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.tokens is not None:
            needed = required_role(scope["method"], scope["path"])
            token = bearer_token(headers)
            account = self.tokens.account(token) if token else None
            if needed is not PUBLIC and account is None:
                message = ("this server needs sign-in: send 'Authorization: Bearer <token>' (ask the server's admin "
                           "for a token)") if token is None else "the token is not valid here: ask the admin for one"
                return await _reply(send, 401, message, {"www-authenticate": "Bearer"})
            if account is not None and not allows(account.role, needed):
                return await _reply(send, 403, f"{scope['method']} {scope['path']} needs the {needed} role; "
                                               f"account {account.name!r} is an {account.role}")
            scope = {**scope, "segany_pet.account": account}
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_request_bytes:
            return await _reply(send, 413, self._too_large())

        received = 0
        started = replied = False

        async def bounded_receive():
            # Past the bound: answer 413 now and tell the app the client left (an exception raised here would
            # be turned into a 400 by the form parser); whatever the app still sends is dropped.
            nonlocal received, replied
            if replied:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received <= self.max_request_bytes:
                return message
            if not started:
                await _reply(send, 413, self._too_large())
                replied = True
            return {"type": "http.disconnect"}

        async def tracked_send(message):
            nonlocal started
            if replied:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, bounded_receive, tracked_send)

    def _too_large(self) -> str:
        return (f"the request is larger than this server accepts ({self.max_request_bytes / 2**20:.0f} MB; "
                "the admin sets it with --conf max_request_mb)")


async def _reply(send, status: int, detail: str, headers: dict | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    fields += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


def install_access_control(app: FastAPI, conf: dict) -> TokenFile | None:
    """Sign-in, roles, allowed origins and the request-size bound on MONAI Label's app, from the app's conf:

    - ``auth_tokens``: the accounts file (sign-in off without it);
    - ``cors_origins``: comma-separated origins (``https://viewer.lab.org``) whose pages may call this server;
      pages the server serves itself (the bundled OHIF) need none. Without credentials: tokens travel in a
      header a page sets, never in cookies a browser adds on its own;
    - ``max_request_mb``: the largest request body (DEFAULT_MAX_REQUEST_MB).

    Replaces MONAI Label's CORS middleware, which echoes any origin with credentials allowed.
    """
    from monailabel.endpoints.user import auth

    tokens = TokenFile(conf["auth_tokens"]) if conf.get("auth_tokens") else None
    origins = [origin.strip().rstrip("/") for origin in str(conf.get("cors_origins", "")).split(",") if origin.strip()]
    for origin in origins:
        if not re.fullmatch(r"https?://[^/\s*]+", origin):
            raise UserInputError(f"cors_origins: {origin!r} is not an origin such as https://viewer.lab.org")
    try:
        max_request_mb = float(conf.get("max_request_mb", DEFAULT_MAX_REQUEST_MB))
        assert 1 <= max_request_mb <= 2**20
    except (ValueError, AssertionError):
        raise UserInputError(f"max_request_mb must be a number of MB from 1 to {2**20}, "
                             f"not {conf.get('max_request_mb')!r}") from None
    others = [entry for entry in app.user_middleware if entry.cls is not CORSMiddleware]
    app.user_middleware = [
        Middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                   allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"], allow_headers=["*"],
                   expose_headers=["X-Label-Box", "Content-Disposition"]),
        Middleware(AccessControl, tokens=tokens, max_request_bytes=int(max_request_mb * 2**20)),
        *others,
    ]
    app.middleware_stack = None  # rebuilt on the next request (see server.install_error_handlers)
    app.dependency_overrides[auth.get_current_user] = current_user
    _add_sign_in_routes(app, tokens)
    logger.info("allowed origins besides the server's own: %s; largest request %.0f MB; sign-in %s",
                origins or "none", max_request_mb, f"on ({tokens.path})" if tokens else "off")
    return tokens


async def current_user(request: Request):
    """MONAI Label's user for its endpoints: the signed-in account, or its default admin with sign-in off."""
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import DEFAULT_USER, User

    account = request.scope.get("segany_pet.account")
    if account is None:
        return DEFAULT_USER
    roles = [settings.MONAI_LABEL_AUTH_ROLE_USER, settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR]
    if account.role == ADMIN:
        roles += [settings.MONAI_LABEL_AUTH_ROLE_REVIEWER, settings.MONAI_LABEL_AUTH_ROLE_ADMIN]
    return User(username=account.name, roles=roles)


def _add_sign_in_routes(app: FastAPI, tokens: TokenFile | None) -> None:
    """MONAI Label's sign-in handshake (``GET /auth/``, ``POST /auth/token``, ``GET /auth/token/valid``), as its
    client and Slicer's module speak it, for bearer tokens: the password is the account's token."""
    from monailabel.config import settings

    from segany_pet.label.routes import add_route_first

    def enabled():
        return {"enabled": tokens is not None, "client_id": None, "realm": None, "scheme": "bearer-token"}

    def token(username: str = Form(...), password: str = Form(...)):
        account = tokens.account(password) if tokens is not None else None
        if tokens is None:
            return {"access_token": None, "token_type": None}
        if account is None or account.name != username:
            raise HTTPException(status_code=401, detail="unknown account or token: the password is your token")
        return {"access_token": password, "token_type": "Bearer"}

    def valid(request: Request):
        account = request.scope.get("segany_pet.account")
        if account is None:
            return {"username": "admin", "roles": list(ROLES), "signed_in": False}
        return {"username": account.name, "roles": list(ROLES[: ROLES.index(account.role) + 1]), "signed_in": True}

    prefix = settings.MONAI_LABEL_API_STR
    add_route_first(app, prefix + "/auth/", enabled, methods=["GET"], tags=["Auth"],
                    summary="Whether sign-in is on")
    add_route_first(app, prefix + "/auth/token", token, methods=["POST"], tags=["Auth"],
                    summary="Exchange an account name and token (as the password) for a bearer token")
    add_route_first(app, prefix + "/auth/token/valid", valid, methods=["GET"], tags=["Auth"],
                    summary="The signed-in account and its roles")


def bound_host(argv: list[str] | None = None) -> str:
    """The address the server listens on, from MONAI Label's start_server arguments (its default 0.0.0.0)."""
    argv = sys.argv if argv is None else argv
    for index, argument in enumerate(argv):
        if argument in ("--host", "-i") and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--host="):
            return argument.split("=", 1)[1]
    return "0.0.0.0"


def warn_if_exposed(tokens: TokenFile | None, host: str) -> None:
    """A loud log line when a server without sign-in listens beyond this machine."""
    if tokens is None and host not in LOOPBACK_HOSTS:
        banner = "!" * 100
        logger.warning(
            "\n%s\nSIGN-IN IS OFF and the server listens on %s: anyone who reaches this port can read, change and "
            "delete images and labels, replace the model and start training. Turn sign-in on with\n"
            "  segany-pet token add <name> --role admin --file tokens.json\n"
            "  ... --conf auth_tokens tokens.json\nor listen on 127.0.0.1 only (README, 'Running it for a lab').\n%s",
            banner, host, banner,
        )
