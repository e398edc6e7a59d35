"""Fixes to the MONAI Label server this app runs in, installed once by the server process.

1. Token check. With `MONAI_LABEL_AUTH_ENABLE=true`, MONAI Label 0.8.5 verifies a token with
   `jwt.decode(token, key, options=...)` and no `algorithms`, which PyJWT 2 refuses for every token: auth on
   means everyone gets 401. `verified_user` checks the signature against the identity provider's published
   keys (its JWKS, as OpenID Connect discovery names it, else the Keycloak realm's `public_key`), accepts only
   asymmetric algorithms (a public key must never double as an HMAC secret), requires an expiry, and reads the
   user and roles from the same claims MONAI Label reads (`MONAI_LABEL_AUTH_TOKEN_*`).
2. Errors that are the client's, not the server's: MONAI Label's endpoints parse `params` with `json.loads`
   and raise its own not-found exceptions, both of which reach the client as a 500. They become a 400 naming
   the bad JSON and a 404 naming what was not found.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jwt
import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.endpoints.user import auth
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

logger = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
_jwks_clients: dict[str, jwt.PyJWKClient] = {}


def _jwks_uri(realm_uri: str) -> str | None:
    try:
        return auth.open_id_configuration(realm_uri).get("jwks_uri")
    except (requests.RequestException, ValueError) as error:
        logger.warning("no OpenID configuration at %s (%s); using the realm's public_key", realm_uri, error)
        return None


def signing_key(token: str, realm_uri: str) -> Any:
    """The identity provider's key that signed `token`."""
    uri = _jwks_uri(realm_uri)
    if uri:
        if uri not in _jwks_clients:
            _jwks_clients[uri] = jwt.PyJWKClient(uri, cache_keys=True, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
        client = _jwks_clients[uri]
        try:
            return client.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientError as error:
            raise jwt.InvalidTokenError(f"no published key verifies this token: {error}") from error
    try:
        return auth.get_public_key(realm_uri)
    except (requests.RequestException, KeyError, ValueError) as error:
        raise jwt.InvalidTokenError(f"the identity provider's key cannot be fetched: {error}") from error


def _claim(payload: dict[str, Any], path: str) -> Any:
    value: Any = payload
    for key in path.split("#"):  # MONAI Label's notation for nested claims, e.g. realm_access#roles
        value = value.get(key) if isinstance(value, dict) else None
    return value


def verified_user(token: str) -> auth.User:
    """Drop-in for `monailabel.endpoints.user.auth.from_token`; raises `jwt.InvalidTokenError` (-> 401)."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return auth.DEFAULT_USER
    payload = jwt.decode(
        token,
        signing_key(token, settings.MONAI_LABEL_AUTH_REALM_URI),
        algorithms=ASYMMETRIC_ALGORITHMS,
        options={"require": ["exp"], "verify_aud": False},  # MONAI Label checks no audience either
    )
    roles = _claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES)
    return auth.User(
        username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or ""),
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=[str(r) for r in roles] if isinstance(roles, list) else [],
    )


async def _bad_json(_: Request, error: Exception) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": f"a request field is not valid JSON: {error}"})


async def _not_found(_: Request, error: Exception) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(getattr(error, "msg", "") or error)})


def install(app: FastAPI) -> None:
    """Install both fixes in the running server (called once, from the app's on_init_complete)."""
    auth.from_token = verified_user  # get_current_user looks the name up at call time
    app.add_exception_handler(json.JSONDecodeError, _bad_json)
    app.add_exception_handler(ImageNotFoundException, _not_found)
    app.add_exception_handler(LabelNotFoundException, _not_found)
    # Starlette builds its handler stack at the first event (the lifespan startup this runs in) and keeps it;
    # dropping it makes the next request build it again, with the handlers above
    app.middleware_stack = None
    logger.info(
        "auth token check (auth %s) and 4xx for bad JSON / unknown ids installed",
        "on" if settings.MONAI_LABEL_AUTH_ENABLE else "off",
    )
