"""The load balancer's small parts: datagram classification, parent notification,
start-up failures (one error line and a named exit code)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import HostPort, Listen, Settings
from cluster.etcd import LocalEtcd, free_port
from cluster.keys import KeyLayout
from cluster.notify import notify as notify_parent
from cluster.notify import notify_ready
from cluster.protocol import FramePacer
from lb import DatagramKind, ExitCode, classify_datagram, main

REQUEST = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.101:5060;branch=z9hG4bKnashds7\r\n"
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1826 REGISTER\r\n"
    b"Content-Length: 0\r\n\r\n"
)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (REQUEST, DatagramKind.REQUEST),
        (b"INVITE sip:bob@biloxi.com SIP/2.0\r\n\r\n", DatagramKind.REQUEST),
        (b"NEWMETHOD.x-1 sips:[2001:db8::1]:5061 sip/2.0\r\n", DatagramKind.REQUEST),
        (b"OPTIONS tel:+15551234 SIP/2.0\r\n", DatagramKind.REQUEST),
        (b"SIP/2.0 200 OK\r\n\r\n", DatagramKind.RESPONSE),
        (b"sip/2.0 486 Busy Here\r\n\r\n", DatagramKind.RESPONSE),
        (b"\r\n\r\n", DatagramKind.PING),
        (b"\r\n", DatagramKind.PONG),
        (b"", DatagramKind.JUNK),
        (b"hello", DatagramKind.JUNK),
        (b"\r\n\r\n\r\n", DatagramKind.JUNK),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", DatagramKind.JUNK),
        # Still SIP: the worker answers 505 and 400 (RFC 4475 3.1.2.16, 3.1.2.9).
        (b"INVITE sip:bob@biloxi.com SIP/3.0\r\n", DatagramKind.REQUEST),
        (b"INVITE  sip:bob@biloxi.com SIP/2.0\r\n", DatagramKind.REQUEST),
        (b"IN(VITE sip:bob@biloxi.com SIP/2.0\r\n", DatagramKind.JUNK),
        (b"INVITE sip:bob@biloxi.com SIP/2.0", DatagramKind.JUNK),  # no line end
        (b"sip/2.0 OK\r\n", DatagramKind.JUNK),
        # The cheap test trusts "SIP/2.0 ": the worker drops what it cannot parse.
        (b"SIP/2.0 OK\r\n", DatagramKind.RESPONSE),
        (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), DatagramKind.JUNK),  # STUN
    ],
)
def test_datagrams_are_classified_by_their_start_line(data: bytes, kind: DatagramKind) -> None:
    assert classify_datagram(data) is kind


def test_notify_ready_writes_one_json_line(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    try:
        monkeypatch.setenv("SIPCLUSTER_NOTIFY_FD", str(write_end))
        assert notify_ready("lb0a1b", "127.0.0.1:9060", lease=42)
        assert notify_ready("lb0a1b", "127.0.0.1:9060")
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            lines = reader.read().splitlines()
    finally:
        for descriptor in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(descriptor)
    assert [json.loads(line) for line in lines] == [
        {"event": "ready", "id": "lb0a1b", "http": "127.0.0.1:9060", "lease": 42},
        {"event": "ready", "id": "lb0a1b", "http": "127.0.0.1:9060"},
    ]


def test_notify_without_a_parent_or_with_a_bad_descriptor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SIPCLUSTER_NOTIFY_FD", raising=False)
    assert not notify_parent("ready")
    monkeypatch.setenv("SIPCLUSTER_NOTIFY_FD", "not-a-number")
    assert not notify_parent("ready")
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    monkeypatch.setenv("SIPCLUSTER_NOTIFY_FD", str(write_end))  # closed
    assert not notify_parent("ready")


def _settings(tmp_path: Path, etcd: str | None, *listen: Listen, **values: object) -> Settings:
    return Settings(
        etcd=etcd,
        etcd_prefix="/lb-start-up-test/",
        listen=listen or (Listen("udp", "127.0.0.1", 0),),
        http=HostPort("127.0.0.1", 0),
        data_dir=tmp_path,
        zmq_bind="tcp://127.0.0.1:0",
        **values,  # type: ignore[arg-type]
    )


def test_unreachable_etcd_is_one_error_and_a_startup_exit_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(_settings(tmp_path, url)) == ExitCode.STARTUP_FAILED
    assert int(ExitCode.STARTUP_FAILED) == 3  # the supervisor's EXIT_STARTUP
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert url in errors[0]
    assert "unreachable" in errors[0]
    assert "\n" not in errors[0]


def test_a_socket_in_use_is_one_error_and_a_startup_exit_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, etcd_server: LocalEtcd
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        settings = _settings(tmp_path, etcd_server.url, Listen("udp", "127.0.0.1", port))
        assert main(settings) == ExitCode.STARTUP_FAILED
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert errors == [f"sipcluster lb: cannot bind udp:127.0.0.1:{port}: Address already in use"]


def test_unusable_settings_exit_with_the_usage_code(tmp_path: Path) -> None:
    assert main(_settings(tmp_path, None)) == ExitCode.CONFIG
    bad_id = _settings(tmp_path, "http://127.0.0.1:2379", id="lb-1")
    assert main(bad_id) == ExitCode.CONFIG


def test_python_m_lb_prints_one_line_when_etcd_is_unreachable(
    tmp_path: Path, key_layout: KeyLayout
) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "lb",
            "--etcd",
            f"http://127.0.0.1:{free_port()}",
            "--etcd-prefix",
            key_layout.prefix.decode(),
            "--listen",
            "udp:127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == ExitCode.STARTUP_FAILED
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert "etcd" in lines[0]
    assert "unreachable" in lines[0]


def test_frame_pacer_sends_at_once_after_a_quiet_spell_and_paces_under_load() -> None:
    pacer = FramePacer(0.002)
    assert pacer.wait(100.0) == 0.0  # nothing sent yet
    pacer.flushed(100.0)
    assert pacer.wait(100.0005) == pytest.approx(0.0015)  # the rest of the interval
    assert pacer.wait(100.002) == 0.0
    pacer.flushed(100.0025)
    assert pacer.wait(100.0026) == pytest.approx(0.0019)
    assert pacer.wait(100.5) == 0.0  # a quiet spell: at the end of this pass
    unpaced = FramePacer(0.0)
    unpaced.flushed(5.0)
    assert unpaced.wait(5.0) == 0.0
    with pytest.raises(ValueError, match="0 or more seconds"):
        FramePacer(-0.001)
