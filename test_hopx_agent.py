"""Tests for hopx_agent.py, in the module's section order: helpers, JWT,
process manager (real children), HTTP through a real server on port 0, CLI.

Only pytest and the standard library. Nothing here sleeps to wait for
something except ``wait_until``; children announce readiness on their output.
"""
import base64
import hashlib
import hmac
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import hopx_agent

# ============================================================================
# Helpers
# ============================================================================

SECRET = b"test-secret-0123456789abcdef0123456789"


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def sign_token(claims, secret=SECRET, alg="HS256", header=None):
    """An HS* token made here, not by the module, so the verifier is not tested against itself."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    head = b64url(json.dumps(header if header is not None else {"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret, (head + "." + body).encode(), digest).digest()
    return head + "." + body + "." + b64url(sig)


def good_token(ttl=3600, secret=SECRET):
    return sign_token({"sub": "tests", "exp": int(time.time()) + ttl}, secret)


def wait_until(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` until it is truthy; the only place in the suite that sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(0.01)


def pid_alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def pids_with_marker(process_id):
    """Live processes whose environment carries HOPX_PROCESS_ID=<process_id>."""
    marker = ("HOPX_PROCESS_ID=%s" % process_id).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if marker in env and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def zombie_children():
    """Our own children that are zombies (<defunct>)."""
    me = str(os.getpid()).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[1] == me and fields[0] == b"Z":
            found.append(int(entry))
    return found


class Client:
    """A tiny http.client wrapper bound to one server; one connection, kept alive."""

    def __init__(self, server, token=None):
        self.host, self.port = server.server_address[:2]
        self.token = token if token is not None else good_token()
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def raw(self, method, path, body=None, headers=None, token=True):
        hdrs = dict(headers or {})
        if token and self.token:
            hdrs.setdefault("Authorization", "Bearer " + self.token)
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        try:
            self.conn.request(method, path, body=body, headers=hdrs)
            resp = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            raise
        data = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return resp.status, resp, data

    def call(self, method, path, body=None, headers=None, token=True):
        """(status, parsed JSON or None, response)."""
        status, resp, data = self.raw(method, path, body, headers, token)
        parsed = json.loads(data) if data and resp.getheader("Content-Type", "").startswith("application/json") else None
        return status, parsed, resp

    def ok(self, method, path, body=None):
        status, parsed, _ = self.call(method, path, body)
        assert status == 200, (status, parsed)
        return parsed

    def close(self):
        self.conn.close()


# ============================================================================
# Fixtures
# ============================================================================


@pytest.fixture
def config(tmp_path):
    return hopx_agent.AgentConfig(host="127.0.0.1", port=0, workdir=str(tmp_path), secret=SECRET,
                                  kill_grace=0.5, max_output_bytes=1024 * 1024)


@pytest.fixture
def manager(config):
    mgr = hopx_agent.ProcessManager(config)
    yield mgr
    ids = list(mgr._records)
    mgr.shutdown(5.0)
    leftovers = {pid for rid in ids for pid in pids_with_marker(rid)}
    assert not leftovers, "children left behind: %s" % sorted(leftovers)


@pytest.fixture
def server(config, manager):
    srv = hopx_agent.create_server(config, manager)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), name="test-serve", daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)
    assert not thread.is_alive()


@pytest.fixture
def client(server):
    c = Client(server)
    yield c
    c.close()
