"""Errors that reach a user: each message says what to fix."""


class UserInputError(ValueError):
    """Bad input from a client or a file; the server answers it with a 4xx."""

    status_code = 422


class MalformedRequestError(UserInputError):
    """A request field that cannot be parsed at all (JSON that is not JSON)."""

    status_code = 400


class InvalidImageError(UserInputError):
    """An image that is unreadable, not 3D, not finite or not PET-like."""


class PromptError(UserInputError):
    """A click or box that cannot be used (outside the volume, wrong type, none given)."""


class SessionNotFoundError(UserInputError):
    """A request to refine a result this server does not hold (expired, reset, or another client's)."""

    status_code = 409


class UnknownImageError(UserInputError):
    """An image id that the datastore does not hold."""

    status_code = 404


class CheckpointError(RuntimeError):
    """A weights file that is missing, damaged or does not fit the model; the message names the keys."""
