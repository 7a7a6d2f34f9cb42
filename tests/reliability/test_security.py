"""API keys (REST header, gRPC metadata; from env and file), gRPC TLS and mutual TLS with
certificates made at test time, no URL fetching, and open probes."""

from __future__ import annotations

import base64
import datetime
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from musiq_client.gen import quality_pb2, quality_pb2_grpc
from service.security import ApiKeys
from service.settings import ServiceSettings
from tests.helpers import jpeg, start_server

KEYS = ("k-env-0123456789", "k-file-abcdefghij")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"# one key per line\n\n{KEYS[1]}\n")
    settings = ServiceSettings(
        grpc_port=0, host="127.0.0.1", api_keys=[KEYS[0]], api_keys_file=key_file, max_queue_delay_s=0.002
    )
    srv, thread, url = start_server(settings)
    yield url, f"127.0.0.1:{srv.config.app.state.grpc_port}"
    srv.should_exit = True
    thread.join(timeout=30)


def _score(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/score", content=jpeg(), headers={"Content-Type": "image/jpeg", **headers}, timeout=60
    )


def test_rest_needs_a_valid_key_from_env_or_file(secured: tuple[str, str]) -> None:
    url, _ = secured
    missing = _score(url, {})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = _score(url, {"X-API-Key": KEYS[0][:-1] + "X"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert _score(url, {"Authorization": "Basic " + KEYS[0]}).status_code == 401
    assert _score(url, {"X-API-Key": KEYS[0]}).status_code == 200
    assert _score(url, {"Authorization": f"Bearer {KEYS[1]}"}).status_code == 200
    batch = httpx.post(f"{url}/v1/score:batch", json={"items": [{"id": "a", "image": "AA=="}]}, timeout=30)
    assert batch.status_code == 401
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401


def test_probes_and_metrics_stay_open(secured: tuple[str, str]) -> None:
    url, target = secured
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 200, path
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_needs_a_valid_key_in_metadata_on_every_method(secured: tuple[str, str]) -> None:
    _, target = secured
    request = quality_pb2.ScoreRequest(id="a", image=jpeg())
    with grpc.insecure_channel(target) as channel:
        stub = quality_pb2_grpc.QualityStub(channel)
        for metadata in ((), (("x-api-key", "nope"),), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(request, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "api_key" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ScoreBatch(quality_pb2.ScoreBatchRequest(items=[request]), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ScoreStream(iter([request]), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Score(request, metadata=(("x-api-key", KEYS[0]),), timeout=60).score
        good = (("authorization", f"Bearer {KEYS[1]}"),)
        assert [r.id for r in stub.ScoreStream(iter([request]), metadata=good, timeout=60)] == ["a"]


def test_key_configuration_fails_closed(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# no keys here\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_settings(ServiceSettings(api_keys_file=empty))
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeys.from_settings(ServiceSettings(api_keys_file=tmp_path / "absent"))
    assert not ApiKeys.from_settings(ServiceSettings()).enabled
    keys = ApiKeys(["a", "bb"])
    assert keys.accepts("bb") and not keys.accepts("b") and not keys.accepts("") and not keys.accepts(None)


def _cert(
    name: str, issuer_key: ec.EllipticCurvePrivateKey | None = None, issuer: x509.Name | None = None
) -> tuple[bytes, bytes, ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName(name)]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, key, subject


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes | Path]:
    """A CA, a server certificate for localhost and a client certificate, all made now, kept in tmp."""
    folder = tmp_path_factory.mktemp("pki")
    ca_pem, _, ca_key, ca_name = _cert("musiq-test-ca")
    server_pem, server_key, _, _ = _cert("localhost", ca_key, ca_name)
    client_pem, client_key, _, _ = _cert("client", ca_key, ca_name)
    rogue_ca_pem, _, rogue_key, rogue_name = _cert("rogue-ca")
    rogue_pem, rogue_key_pem, _, _ = _cert("rogue", rogue_key, rogue_name)
    out: dict[str, bytes | Path] = {}
    for name, data in {"ca": ca_pem, "server": server_pem, "server_key": server_key}.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    out |= {"ca_pem": ca_pem, "client": client_pem, "client_key": client_key}
    out |= {"rogue": rogue_pem, "rogue_key": rogue_key_pem, "rogue_ca": rogue_ca_pem}
    return out


def _tls_server(pki: dict[str, bytes | Path], mutual: bool) -> tuple[Any, threading.Thread, str]:
    settings = ServiceSettings(
        grpc_port=0,
        host="127.0.0.1",
        grpc_tls_cert=pki["server"],
        grpc_tls_key=pki["server_key"],
        grpc_tls_client_ca=pki["ca"] if mutual else None,
    )
    srv, thread, _ = start_server(settings)
    return srv, thread, f"localhost:{srv.config.app.state.grpc_port}"


def _tls_score(target: str, credentials: grpc.ChannelCredentials) -> float:
    with grpc.secure_channel(target, credentials) as channel:
        return (
            quality_pb2_grpc.QualityStub(channel)
            .Score(quality_pb2.ScoreRequest(image=jpeg()), timeout=30)
            .score
        )


def _pem(pki: dict[str, bytes | Path], name: str) -> bytes:
    value = pki[name]
    assert isinstance(value, bytes), name
    return value


def test_grpc_tls_and_mutual_tls(pki: dict[str, bytes | Path]) -> None:
    ca = _pem(pki, "ca_pem")
    srv, thread, target = _tls_server(pki, mutual=False)
    try:
        assert _tls_score(target, grpc.ssl_channel_credentials(root_certificates=ca))
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
            quality_pb2_grpc.QualityStub(channel).Score(quality_pb2.ScoreRequest(image=jpeg()), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    finally:
        srv.should_exit = True
        thread.join(timeout=30)

    srv, thread, target = _tls_server(pki, mutual=True)
    try:
        client = grpc.ssl_channel_credentials(ca, _pem(pki, "client_key"), _pem(pki, "client"))
        assert _tls_score(target, client)
        for credentials in (
            grpc.ssl_channel_credentials(root_certificates=ca),  # no client certificate
            grpc.ssl_channel_credentials(ca, _pem(pki, "rogue_key"), _pem(pki, "rogue")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                _tls_score(target, credentials)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_image_urls_are_never_fetched() -> None:
    """A URL where an image belongs is refused as data; the URL's host never sees a connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    srv, thread, url = start_server(ServiceSettings(grpc_port=0, host="127.0.0.1"))
    try:
        link = f"http://127.0.0.1:{port}/photo.jpg"
        raw = httpx.post(f"{url}/v1/score", content=link.encode(), headers={"Content-Type": "image/jpeg"})
        assert raw.status_code == 415
        as_text = httpx.post(
            f"{url}/v1/score", content=link.encode(), headers={"Content-Type": "text/uri-list"}
        )
        assert as_text.status_code == 415
        batch = httpx.post(f"{url}/v1/score:batch", json={"items": [{"id": "u", "image": link}]}, timeout=30)
        assert batch.json()["results"][0]["error"]["code"] == "bad_base64"
        b64 = base64.b64encode(link.encode()).decode()
        batch = httpx.post(f"{url}/v1/score:batch", json={"items": [{"id": "u", "image": b64}]}, timeout=30)
        assert batch.json()["results"][0]["error"]["code"] == "image_unrecognised"
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
        srv.should_exit = True
        thread.join(timeout=30)
