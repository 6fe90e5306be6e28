"""A real FHIR server with Bulk Data ``$export`` for the tests: sekmet-fhir (``sekmet serve``) on loopback.

Started once per test session (``conftest.fhir_server``) on a free port, in its own working folder under the test
session's temporary folder (its SQLite store goes to ``data/``), with ``SEKMET_BASE_URL`` set so its status and
file URLs point at itself. Its ``settings.yaml`` turns on SMART Backend Services with two clients whose keys are
generated here: ``odyssey-rs`` (RSA, RS384, a PEM key) and ``odyssey-es`` (EC P-384, ES384, a JWK set); tokens
last ``token_lifetime`` seconds. Loaded with the first ``patients`` Synthea patients of
``../shared/data/fhir/synthea-smart-100-ndjson`` through one transaction Bundle of PUTs (ids kept).
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

SYNTHEA = "fhir/synthea-smart-100-ndjson"


@dataclass(frozen=True)
class FhirServer:
    base_url: str  # http://127.0.0.1:PORT/fhir
    folder: Path
    rsa_pem: str  # private key of odyssey-rs (PEM)
    ec_jwks: str  # private JWK set of odyssey-es
    other_pem: str  # a key no client registered
    patients: list[str]


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sekmet_binary() -> str:
    beside = Path(sys.executable).parent / "sekmet"
    if beside.exists():
        return str(beside)
    raise FileNotFoundError("the `sekmet` command is missing: install the dev extra (sekmet-fhir)")


def _keys(folder: Path) -> tuple[str, str, str, dict, dict]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    def pem(key) -> str:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()  # fmt: skip

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    rsa_public = {**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "rs-1", "alg": "RS384"}
    ec_private = {**json.loads(ECAlgorithm.to_jwk(ec_key)), "kid": "es-1", "alg": "ES384"}
    ec_public = {k: v for k, v in ec_private.items() if k != "d"}
    return pem(rsa_key), json.dumps({"keys": [ec_private]}), pem(other), rsa_public, ec_public


def patient_resources(source: Path, patients: int) -> tuple[list[dict], list[str]]:
    """The first ``patients`` patients of the NDJSON export in ``source`` and every resource whose subject or
    patient is one of them (files in name order), with those patients' ids, sorted."""
    with gzip.open(source / "Patient.ndjson.gz", "rt") as fh:
        ids = {json.loads(line)["id"] for _, line in zip(range(patients), fh, strict=False)}
    chosen = []
    for path in sorted(source.glob("*.ndjson.gz")):
        with gzip.open(path, "rt") as fh:
            for line in fh:
                resource = json.loads(line)
                ref = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
                if (resource["resourceType"] == "Patient" and resource["id"] in ids) or ref.removeprefix(
                    "Patient/"
                ) in ids:
                    chosen.append(resource)
    return chosen, sorted(ids)


def transaction_bundle(resources: list[dict]) -> dict:
    """A transaction Bundle that PUTs ``resources`` (ids kept)."""
    entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
               for r in resources]  # fmt: skip
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def synthea_bundle(shared: Path, patients: int) -> tuple[dict, list[str]]:
    """A transaction Bundle (PUT, ids kept) of the first ``patients`` patients and every resource of theirs."""
    resources, ids = patient_resources(shared / SYNTHEA, patients)
    return transaction_bundle(resources), ids


@contextmanager
def sekmet_process(folder: Path, settings: dict) -> Iterator[str]:
    """``sekmet serve`` on a free loopback port with ``settings`` (``base_url``, ``port`` and ``host`` are set
    here), in ``folder`` (its log: ``sekmet.log``); yields the FHIR base URL once the server answers, and kills it
    afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    settings = {**settings, "base_url": base, "host": "127.0.0.1", "port": port}
    (folder / "settings.yaml").write_text(json.dumps(settings))  # JSON is YAML
    env = {**os.environ, "SEKMET_BASE_URL": base, "SEKMET_CONFIG": str(folder / "settings.yaml")}
    log = (folder / "sekmet.log").open("wb")
    process = subprocess.Popen(
        [sekmet_binary(), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"sekmet exited: {(folder / 'sekmet.log').read_text()[-2000:]}")
            try:
                httpx.get(f"{base}/metadata", timeout=2)  # any answer: the app has started
                break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("sekmet did not start within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


@contextmanager
def sekmet(folder: Path, shared: Path, patients: int = 12, token_lifetime: int = 300) -> Iterator[FhirServer]:
    folder.mkdir(parents=True, exist_ok=True)
    rsa_pem, ec_jwks, other_pem, rsa_public, ec_public = _keys(folder)
    settings = {
        "data_dir": str(folder / "data"),
        "log_inbound": False,
        "simulator": {"enabled": False, "delay_seconds": 0.5},
        "validation": {"inbound": "off"},
        "server_auth": {
            "types": ["smart"], "token_lifetime": token_lifetime, "enforce_scopes": True,
            "smart_clients": [
                {"client_id": "odyssey-rs", "jwks": {"keys": [rsa_public]}, "scopes": "system/*.rs system/*.cruds"},
                {"client_id": "odyssey-es", "jwks": {"keys": [ec_public]}, "scopes": "system/*.rs"},
            ],
        },
    }  # fmt: skip
    with sekmet_process(folder, settings) as base:
        bundle, ids = synthea_bundle(shared, patients)
        server = FhirServer(base, folder, rsa_pem, ec_jwks, other_pem, ids)
        response = httpx.post(base, json=bundle, headers=admin_headers(server), timeout=300)
        assert response.status_code == 200, response.text[:500]
        yield server


def admin_headers(server: FhirServer) -> dict[str, str]:
    """A token of ``odyssey-rs`` with write scopes, for changing the server's data in the tests."""
    from odyssey_batch.pull.auth import SmartBackendAuth, load_signing_key

    with httpx.Client(timeout=30) as http:
        auth = SmartBackendAuth(http, server.base_url, "odyssey-rs", load_signing_key(server.rsa_pem, "rs-1"),
                                scope="system/*.cruds")  # fmt: skip
        return {**auth.headers(), "Content-Type": "application/fhir+json"}
