"""Fixes to the MONAI Label server this app runs in, installed once by the server process.

1. Token check. With `MONAI_LABEL_AUTH_ENABLE=true`, MONAI Label 0.8.5 verifies a token with
   `jwt.decode(token, key, options=...)` and no `algorithms`, which PyJWT 2 refuses for every token: auth on
   means everyone gets 401. `verified_user` checks the signature against the identity provider's published
   keys (its JWKS, as OpenID Connect discovery names it, else the Keycloak realm's `public_key`), accepts only
   asymmetric algorithms (a public key must never double as an HMAC secret), requires an expiry, and reads the
   user and roles from the same claims MONAI Label reads (`MONAI_LABEL_AUTH_TOKEN_*`).
2. Errors that are the client's, not the server's, which MONAI Label answers with a 500 (found by
   tests/test_api_fuzz.py): `params`/`info` that are not JSON, or JSON that is not an object; an infer request
   with neither an image nor a file nor a session; a session upload marked `uncompress` that is no archive; its
   own not-found exceptions. They become a 400 or 404 that
   names the problem. Anything else stays a 500: a bug must not pass for a bad request.
3. One slow request must not stop the others. MONAI Label declares its endpoints `async def` but infers, hands
   out samples and saves labels synchronously inside them, on the server's one event loop: every request
   waits for the one in progress (measured with 8 annotators: clicks on encoded slices at p95 6.2 s, all of it
   queueing). Those endpoints are re-registered as plain functions, which FastAPI runs in its thread pool.
4. The DICOMweb proxy (`/proxy/dicom/...`, what the bundled OHIF talks to) forwards GET requests without
   their query string: a study search by patient, date or `limit` came back as every study in the PACS.
   The query string is forwarded (metadata requests, which the proxy re-routes by their path's end, too).
   A DICOM SEG stored through the proxy (OHIF's "Export DICOM SEG") is a new final label: the DICOMweb
   datastore's cached listings are refreshed, as after a label saved through the server.
5. The OHIF viewer's defects (lib.viewer).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import shutil
from collections.abc import Callable
from typing import Any

import jwt
import requests
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints import proxy
from monailabel.endpoints.user import auth
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from lib import viewer
from lib.datastore.dicomweb import refresh_listings

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


# MONAI Label endpoints that index into the JSON a client sent (`params`, `info`): there a TypeError means the
# JSON was a number, list or string instead of an object
_JSON_OBJECT_ENDPOINTS = ("/datastore/", "/infer/", "/activelearning/", "/session/", "/scoring/", "/train/")


async def _not_an_object(request: Request, error: Exception) -> JSONResponse:
    if request.url.path.startswith(_JSON_OBJECT_ENDPOINTS) and "item assignment" in str(error):
        return JSONResponse(status_code=400, content={"detail": "`params` / `info` must be a JSON object"})
    raise error


async def _not_an_archive(_: Request, error: Exception) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": f"uncompress=true needs a zip or tar archive: {error}"})


# MONAI Label's own 500s that describe a client's mistake -> (status, message)
_CLIENT_MISTAKES = {
    "Neither Image nor File not Session ID input is provided": (
        400,
        "infer needs an image: give `image` (a datastore id), upload a `file`, or name a `session_id`",
    ),
}


async def _recode(request: Request, error: Exception) -> JSONResponse:
    if isinstance(error, HTTPException) and error.status_code == 500 and error.detail in _CLIENT_MISTAKES:
        status, message = _CLIENT_MISTAKES[error.detail]
        return JSONResponse(status_code=status, content={"detail": message})
    return await http_exception_handler(request, error)


# (method, path) of MONAI Label endpoints that do blocking work inside `async def`
BLOCKING_ENDPOINTS = [("POST", "/infer/{model}"), ("POST", "/activelearning/{strategy}"), ("PUT", "/datastore/label")]


def _in_a_thread(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function with `endpoint`'s signature that runs it to completion in the calling (pool) thread."""

    def threaded(**kwargs: Any) -> Any:
        return asyncio.run(endpoint(**kwargs))  # the coroutine never awaits: this is a plain call

    threaded.__signature__ = inspect.signature(endpoint)  # FastAPI reads the parameters from here
    threaded.__name__ = endpoint.__name__
    threaded.__doc__ = endpoint.__doc__
    return threaded


def _routers(app: FastAPI) -> list[Any]:
    """The app's router and the routers it includes (FastAPI >= 0.130 keeps those apart, as `_IncludedRouter`)."""
    routers = [app.router]
    for route in app.router.routes:
        if hasattr(route, "original_router"):
            routers.append(route.original_router)
    return routers


def run_blocking_endpoints_in_threads(app: FastAPI) -> int:
    """Replace each route of BLOCKING_ENDPOINTS by the same route run in FastAPI's thread pool."""
    replaced = 0
    for router in _routers(app):
        for route in list(router.routes):
            if not isinstance(route, APIRoute) or not inspect.iscoroutinefunction(route.endpoint):
                continue
            if not any(route.path == path and method in route.methods for method, path in BLOCKING_ENDPOINTS):
                continue
            # remove, then add: these paths overlap no other route of their router, so order does not matter
            router.routes.remove(route)
            router.add_api_route(
                route.path.removeprefix(router.prefix),
                _in_a_thread(route.endpoint),
                methods=sorted(route.methods),
                summary=route.summary,
                description=route.description,
                tags=route.tags,
                include_in_schema=route.include_in_schema,
                deprecated=route.deprecated,
                openapi_extra=route.openapi_extra,
                response_model=route.response_model,
            )
            replaced += 1
    app.openapi_schema = None
    return replaced


_proxy_dicom = proxy.proxy_dicom


async def proxy_dicom_with_query(request: Request, op: str, path: str):
    """MONAI Label's DICOMweb proxy, given the request's query string along with its path."""
    query = request.url.query
    if query and path.endswith("metadata") and op == "qido":  # the proxy sends these to WADO by the path's end
        op = "wado"
    answer = await _proxy_dicom(request, op, f"{path}?{query}" if query else path)
    if request.method == "POST" and "studies" in path.split("/") and answer.status_code < 300:
        refresh_listings()  # STOW-RS: a viewer stored instances, perhaps a SEG (a final label)
    return answer


def install(app: FastAPI) -> None:
    """Install the fixes in the running server (called once, from the app's on_init_complete)."""
    auth.from_token = verified_user  # get_current_user looks the name up at call time
    proxy.proxy_dicom = proxy_dicom_with_query  # the proxy routes look the name up at call time
    viewer.install()
    app.add_exception_handler(json.JSONDecodeError, _bad_json)
    app.add_exception_handler(ImageNotFoundException, _not_found)
    app.add_exception_handler(LabelNotFoundException, _not_found)
    app.add_exception_handler(TypeError, _not_an_object)
    app.add_exception_handler(HTTPException, _recode)
    app.add_exception_handler(shutil.ReadError, _not_an_archive)  # raised only by shutil.unpack_archive
    threaded = run_blocking_endpoints_in_threads(app)
    # Starlette builds its handler stack at the first event (the lifespan startup this runs in) and keeps it;
    # dropping it makes the next request build it again, with the handlers above
    app.middleware_stack = None
    logger.info(
        "auth token check (auth %s), 4xx for client mistakes, %d blocking endpoints moved to threads",
        "on" if settings.MONAI_LABEL_AUTH_ENABLE else "off",
        threaded,
    )
