"""How the pull authenticates to the FHIR server: SMART Backend Services, a static bearer token, or nothing.

SMART Backend Services (client-confidential-asymmetric, SMART App Launch 2.x): the client signs a JWT assertion
(``iss`` = ``sub`` = client id, ``aud`` = the token endpoint, ``exp`` at most 5 minutes ahead, a fresh ``jti``;
header ``kid``) with its private key, RS384 (RSA) or ES384 (EC P-384), and trades it at the token endpoint for an
access token (``grant_type=client_credentials``, ``scope`` e.g. ``system/*.rs``). The token endpoint comes from the
server's ``.well-known/smart-configuration`` unless configured. The key is a PEM private key or a JWK set (the
private key with its ``kid``), given as text or as a path to a file. Signing is PyJWT's (``cryptography``), never
ours.

Tokens last minutes (Epic: 5) while exports take hours: ``headers()`` gets a new token when the current one is
within ``refresh_margin`` of its expiry, and ``invalidate()`` (after a 401) forces one. A token endpoint that fails
transiently (network error, 429, 5xx) is retried with backoff; a refusal (400/401: wrong key, unknown client,
scope not allowed) is an ``AuthError`` with the server's ``error_description``. Every key and token is
registered with ``redaction.remember_secrets`` as soon as it is read, so no message or log line can carry it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from odyssey_batch import redaction
from odyssey_batch.pull.retry import RetryPolicy

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SCOPE = "system/*.rs"


class AuthError(RuntimeError):
    """The server refused our credentials (no retry helps)."""


class Auth(Protocol):
    def headers(self) -> dict[str, str]: ...

    def invalidate(self) -> None: ...

    @property
    def sends_token(self) -> bool: ...


class NoAuth:
    sends_token = False

    def headers(self) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        pass


class StaticBearer:
    sends_token = True

    def __init__(self, token: str):
        redaction.remember_secrets(token)
        self._token = token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:  # nothing to refresh: a 401 is final
        pass


@dataclass(frozen=True)
class SigningKey:
    key: Any  # a cryptography private key
    algorithm: str  # RS384 | ES384
    kid: str


def _read_key_text(value: str) -> str:
    text = value.strip()
    if text.startswith(("-----BEGIN", "{")):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise AuthError("the private key is neither PEM text, a JWK set, nor a readable file")
    return path.read_text()


def load_signing_key(value: str, kid: str = "", algorithm: str = "") -> SigningKey:
    """The signing key from PEM text, a JWK set (or one JWK) as JSON text, or a path to a file holding either.
    ``kid``: required by SMART; from the JWK when it has one, else the RFC 7638 thumbprint of the public key."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    text = _read_key_text(value)
    redaction.remember_secrets(text)
    jwk: dict[str, Any] | None = None
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            raise AuthError("the JWK set is not valid JSON") from None
        keys = document.get("keys", [document]) if isinstance(document, dict) else []
        private = [k for k in keys if isinstance(k, dict) and "d" in k and (not kid or k.get("kid") == kid)]
        if not private:
            raise AuthError(f"the JWK set holds no private key{' with kid ' + kid if kid else ''}")
        jwk = private[0]
        for part in ("d", "p", "q", "dp", "dq", "qi"):
            redaction.remember_secrets(jwk.get(part))
        loader = RSAAlgorithm if jwk.get("kty") == "RSA" else ECAlgorithm
        key = loader.from_jwk(json.dumps(jwk))
    else:
        try:
            key = load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError):
            raise AuthError("the private key is not a readable, unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        default_alg, public = "RS384", json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        default_alg, public = "ES384", json.loads(ECAlgorithm.to_jwk(key.public_key()))
    else:
        raise AuthError("the private key must be RSA (RS384) or EC P-384 (ES384)")
    alg = algorithm or (jwk or {}).get("alg") or default_alg
    if alg not in ("RS384", "ES384", "RS256", "ES256"):
        raise AuthError(f"unsupported signing algorithm {alg} (use RS384 or ES384)")
    return SigningKey(key, alg, kid or (jwk or {}).get("kid") or _thumbprint(public))


def _thumbprint(public_jwk: dict[str, str]) -> str:
    import base64
    import hashlib

    members = ("e", "kty", "n") if public_jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: public_jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def discover_token_url(http: httpx.Client, base_url: str) -> str:
    """``token_endpoint`` from ``[base]/.well-known/smart-configuration``."""
    url = base_url.rstrip("/") + "/.well-known/smart-configuration"
    response = http.get(url, headers={"Accept": "application/json"})
    if response.status_code != 200:
        raise AuthError(f"{url} answered {response.status_code}: no SMART configuration to find the token endpoint")
    try:
        token_url = response.json()["token_endpoint"]
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"{url} has no token_endpoint") from None
    return token_url


class SmartBackendAuth:
    """SMART Backend Services with a private-key JWT assertion; thread-safe (downloads share it)."""

    sends_token = True

    def __init__(self, http: httpx.Client, base_url: str, client_id: str, key: SigningKey, *,
                 scope: str = DEFAULT_SCOPE, token_url: str = "", refresh_margin: float = 60.0,
                 policy: RetryPolicy | None = None, sleep=time.sleep):  # fmt: skip
        self.http = http
        self.base_url = base_url
        self.client_id = client_id
        self.key = key
        self.scope = scope or DEFAULT_SCOPE
        self.token_url = token_url
        self.refresh_margin = refresh_margin
        self.policy = policy or RetryPolicy(max_attempts=5, max_wait=30.0)
        self._sleep = sleep
        self._token: str | None = None
        self._expires = 0.0
        self._margin = refresh_margin
        self._lock = threading.Lock()
        self.tokens_issued = 0

    def assertion(self) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url, "iat": now,
                  "exp": now + 240, "jti": uuid.uuid4().hex}  # fmt: skip
        return jwt.encode(claims, self.key.key, algorithm=self.key.algorithm,
                          headers={"kid": self.key.kid, "typ": "JWT"})  # fmt: skip

    def _fetch(self) -> None:
        if not self.token_url:
            self.token_url = discover_token_url(self.http, self.base_url)
        for attempt in range(self.policy.max_attempts + 1):
            form = {"grant_type": "client_credentials", "scope": self.scope,
                    "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.assertion()}  # fmt: skip
            retry_after = None
            try:
                response = self.http.post(self.token_url, data=form, headers={"Accept": "application/json"})
            except httpx.TransportError as exc:
                problem = f"token endpoint unreachable: {type(exc).__name__}"
            else:
                if response.status_code == 200:
                    body = response.json()
                    token = body.get("access_token")
                    if not token:
                        raise AuthError("the token endpoint answered 200 without an access_token")
                    redaction.remember_secrets(token)
                    self._token = token
                    lifetime = float(body.get("expires_in") or 300)
                    self._expires = time.monotonic() + lifetime
                    self._margin = min(self.refresh_margin, lifetime / 5)  # short tokens: refresh at 80%
                    self.tokens_issued += 1
                    return
                if response.status_code != 429 and response.status_code < 500:
                    raise AuthError(f"the token endpoint refused the client: {_oauth_error(response)}")
                problem = f"token endpoint answered {response.status_code}"
                retry_after = response.headers.get("Retry-After")
            if attempt == self.policy.max_attempts:
                raise AuthError(f"{problem} ({attempt + 1} tries)")
            self._sleep(self.policy.wait(attempt, retry_after))

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires - self._margin:
                self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        with self._lock:
            self._token = None


def _oauth_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict):
        parts = [str(body.get("error") or f"HTTP {response.status_code}"), str(body.get("error_description") or "")]
        return redaction.redact(": ".join(p for p in parts if p))
    return f"HTTP {response.status_code}"


def build_auth(http: httpx.Client, base_url: str, *, kind: str = "", client_id: str = "", private_key: str = "",
               key_id: str = "", algorithm: str = "", scope: str = "", token_url: str = "",
               bearer_token: str = "") -> Auth:  # fmt: skip
    """The authentication a pull uses: ``kind`` ``smart``, ``bearer`` or ``none``; empty: ``smart`` when a client
    id is configured, ``bearer`` when a token is, else ``none``."""
    kind = kind or ("smart" if client_id else "bearer" if bearer_token else "none")
    if kind == "none":
        return NoAuth()
    if kind == "bearer":
        if not bearer_token:
            raise AuthError("bearer authentication needs a token (ODYSSEY_PULL_BEARER_TOKEN)")
        return StaticBearer(bearer_token)
    if kind == "smart":
        if not client_id or not private_key:
            raise AuthError("SMART Backend Services needs a client id and a private key "
                            "(ODYSSEY_PULL_CLIENT_ID, ODYSSEY_PULL_PRIVATE_KEY)")  # fmt: skip
        key = load_signing_key(private_key, key_id, algorithm)
        return SmartBackendAuth(http, base_url, client_id, key, scope=scope, token_url=token_url)
    raise AuthError(f"unknown authentication {kind!r} (smart, bearer or none)")
