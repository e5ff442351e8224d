"""Start-up and graceful shutdown of the real process: /ready, SIGTERM with requests in flight
(finished within the grace period, cut after it), exit code 0."""

from __future__ import annotations

import json
import threading
import time

import requests

from conftest import CHAT, Server


def collect_stream(server: Server, body: dict, frames: list, started: threading.Event):
    """Reads one SSE response into `frames` (the JSON of each data frame, or "[DONE]")."""
    with requests.post(server.url + CHAT, json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                data = line[len(b"data: "):].decode()
                frames.append(data if data == "[DONE]" else json.loads(data))
                if len(frames) >= 3:
                    started.set()


def test_sigterm_when_idle_exits_0_promptly(spawn_server):
    server = spawn_server()
    assert server.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    started = time.monotonic()
    server.terminate()
    assert server.wait(timeout=15) == 0, server.log_tail()
    assert time.monotonic() - started < 10
    assert "received SIGTERM" in server.log_text()


def test_sigterm_finishes_short_requests_and_cuts_long_ones(spawn_server):
    grace = 3.0
    server = spawn_server("--shutdown-grace", grace)
    short_body = {
        "messages": [{"role": "user", "content": "Say something short."}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
    }
    long_body = dict(short_body, max_tokens=30000, messages=[{"role": "user", "content": "Go on forever."}])
    short, long = [], []
    short_started, long_started = threading.Event(), threading.Event()
    errors = []

    def run(body, frames, started):
        try:
            collect_stream(server, body, frames, started)
        except Exception as err:  # reported below, in the test's thread
            errors.append(err)
            started.set()

    threads = [
        threading.Thread(target=run, args=(long_body, long, long_started)),
        threading.Thread(target=run, args=(short_body, short, short_started)),
    ]
    threads[0].start()
    assert long_started.wait(30)
    threads[1].start()
    assert short_started.wait(30)
    signalled = time.monotonic()
    server.terminate()

    # Not admitting any more: a new request is refused (503) or finds the listener closed.
    time.sleep(0.2)
    try:
        late = requests.post(server.url + CHAT, json={"messages": [{"role": "user", "content": "x"}]}, timeout=10)
        assert late.status_code == 503, late.text
        assert late.json()["error"]["code"] == "shutting_down"
    except requests.ConnectionError:
        pass

    for thread in threads:
        thread.join(timeout=grace + 30)
    assert not errors, errors
    code = server.wait(timeout=grace + 20)
    elapsed = time.monotonic() - signalled
    assert code == 0, server.log_tail()
    assert elapsed < grace + 10, f"exit took {elapsed:.1f} s with a {grace} s grace period"

    # The short request ran to its end.
    assert short[-1] == "[DONE]"
    assert short[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    # The long one was cut at the deadline with an error frame, not left hanging.
    assert long[-1] == "[DONE]", long[-3:]
    assert long[-2]["error"]["code"] == "shutting_down", long[-2]
    assert elapsed >= grace - 0.5, "the long request was cut before the grace period ended"


def test_ready_is_served_before_any_request(spawn_server):
    server = spawn_server(ready=False)
    deadline = time.monotonic() + 60
    seen = set()
    while time.monotonic() < deadline:
        try:
            health = requests.get(server.url + "/health", timeout=5)
            ready = requests.get(server.url + "/ready", timeout=5)
        except requests.ConnectionError:
            time.sleep(0.02)
            continue
        assert health.status_code == 200
        seen.add(ready.status_code)
        if ready.status_code == 200:
            break
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        time.sleep(0.01)
    assert 200 in seen
    models = requests.get(server.url + "/v1/models", timeout=5).json()["data"]
    assert models[0]["builtin"] is True
    assert "built-in" in server.log_text()
