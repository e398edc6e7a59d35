"""With MONAI Label's auth on, tokens are verified against the identity provider's published keys and every
endpoint keeps MONAI Label's roles (model changes: admin; labels and scoring runs: annotator; reading: user).

The identity provider is the one part that is not real: a loopback HTTP server publishes, as Keycloak does, a
realm document with its `public_key`, an OpenID configuration and a JWKS, for an RSA key the test generates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from monailabel.client import MONAILabelClient

from conftest import quiet_server_conf, server_folders
from lib.evaluation.server import ServerProcess

pytestmark = pytest.mark.slow

ADMIN, REVIEWER, ANNOTATOR, USER = (f"monailabel-{r}" for r in ("admin", "reviewer", "annotator", "user"))


class IdentityProvider:
    """A Keycloak-shaped realm on 127.0.0.1 that signs tokens with its own RSA key."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = self.key.public_key()
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        jwk.update(kid="test-key", use="sig", alg="RS256")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self.httpd.server_port}/realms/test"
        self.documents = {
            "/realms/test": {"realm": "test", "public_key": base64.b64encode(der).decode()},
            "/realms/test/.well-known/openid-configuration": {
                "issuer": self.realm,
                "jwks_uri": f"{self.realm}/protocol/openid-connect/certs",
                "token_endpoint": f"{self.realm}/protocol/openid-connect/token",
            },
            "/realms/test/protocol/openid-connect/certs": {"keys": [jwk]},
        }
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _handler(self):
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                document = provider.documents.get(self.path)
                body = json.dumps(document).encode()
                self.send_response(200 if document else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler

    def token(self, roles: list[str], expires_in: float = 600, key=None, algorithm: str = "RS256") -> str:
        claims = {
            "preferred_username": "annotator-1",
            "email": "a@example.org",
            "realm_access": {"roles": roles},
            "exp": int(time.time() + expires_in),
        }
        if algorithm == "HS256":  # the classic attack: the public key as an HMAC secret (PyJWT will not sign it)
            encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=")  # noqa: E731
            signed = encode({"alg": "HS256", "typ": "JWT", "kid": "test-key"}) + b"." + encode(claims)
            signature = hmac.new(key, signed, hashlib.sha256).digest()
            return (signed + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()
        return jwt.encode(claims, key or self.key, algorithm=algorithm, headers={"kid": "test-key"})


@pytest.fixture(scope="module")
def provider():
    idp = IdentityProvider()
    idp.thread.start()
    yield idp
    idp.httpd.shutdown()


@pytest.fixture(scope="module")
def auth_server(sample_data, provider, tmp_path_factory):
    studies, log = server_folders(sample_data, tmp_path_factory, "-auth")
    conf = quiet_server_conf(sample_data, tmp_path_factory.mktemp("model-auth"))
    env = {
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        "MONAI_LABEL_AUTH_ENABLE": "true",
        "MONAI_LABEL_AUTH_REALM_URI": provider.realm,
    }
    with ServerProcess(studies, log, conf, env=env) as server:
        yield server


def _call(server, method: str, path: str, token: str | None, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, server.url + path, headers=headers, timeout=120, **kwargs)


def test_tokens_that_are_missing_forged_expired_or_hmac_are_refused(auth_server, provider):
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = {
        "no token": None,
        "signed by another key": provider.token([USER], key=other_key),
        "expired": provider.token([USER], expires_in=-60),
        "HS256 with the public key as secret": provider.token([USER], key=provider.public_pem, algorithm="HS256"),
        "not a JWT": "abc.def.ghi",
    }
    for why, token in refused.items():
        assert _call(auth_server, "GET", "/info/", token).status_code == 401, why
    assert _call(auth_server, "GET", "/info/", provider.token([USER])).status_code == 200


def test_roles_gate_labels_training_rollback_and_scoring(auth_server, provider, sample_data, tmp_path):
    user, annotator = provider.token([USER]), provider.token([ANNOTATOR, USER])
    admin = provider.token([ADMIN, REVIEWER, ANNOTATOR, USER])
    label = Path(sample_data / "ground-truth" / "sub-01.nii.gz")

    def save(token):
        with open(label, "rb") as handle:
            files = {"label": ("sub-01.nii.gz", handle)}
            return _call(auth_server, "PUT", "/datastore/label?image=sub-01&tag=final", token, files=files)

    rollback = {"json": {"rollback": "0"}}
    weights = {"files": {"file": ("w.pt", b"x")}}
    role = "is required"
    # MONAI Label asks only an annotator's role to upload weights; the app refuses every upload
    refused = "cannot be uploaded"
    expected = [  # (what, method, path, request arguments, token, status, text in the answer)
        ("read the model history", "GET", "/info/", {}, user, 200, "foundation"),
        ("read an image's scores", "GET", "/datastore/image/info?image=sub-01", {}, user, 200, "name"),
        ("start scoring as a user", "POST", "/scoring/foundation_uncertainty", {}, user, 403, role),
        ("roll back as an annotator", "POST", "/train/foundation", rollback, annotator, 403, role),
        ("remove a label as an annotator", "DELETE", "/datastore/label?id=sub-01&tag=final", {}, annotator, 403, role),
        ("upload weights as an annotator", "PUT", "/model/foundation", weights, annotator, 403, refused),
        ("upload weights as an admin", "PUT", "/model/foundation", weights, admin, 403, refused),
    ]
    for what, method, path, arguments, token, status, text in expected:
        response = _call(auth_server, method, path, token, **arguments)
        assert response.status_code == status, (what, response.status_code, response.text)
        assert text in response.text, (what, response.text)
    assert save(user).status_code == 403
    assert save(annotator).status_code == 200

    # the Slicer module's client with a token: infer as a user
    client = MONAILabelClient(auth_server.url, tmpdir=str(tmp_path))
    client.update_auth({"token_type": "Bearer", "access_token": user})
    _, params = client.infer("foundation_2d", "sub-01", {"foreground": [[60, 70, 40]]})
    assert params["slice"] == 40

    # an admin may roll back (it runs as a training task); stopped at once to spare the CPU
    response = _call(auth_server, "POST", "/train/foundation", admin, **rollback)
    assert response.status_code == 200, response.text
    assert _call(auth_server, "DELETE", "/train/", annotator).status_code == 403
    assert _call(auth_server, "DELETE", "/train/", admin).status_code == 200
