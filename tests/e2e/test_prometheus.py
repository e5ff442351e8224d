"""A real Prometheus (Debian's `prometheus` package) scrapes the server every second; its query API
must return the serving series with the values the clients saw."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import BUILTIN_MODEL, CHAT, _die_with_parent, data_uri, free_port, image_part, image_token_counts, user

JOB = "tga-serve"


class Prometheus:
    def __init__(self, target_port: int):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "`prometheus` is not on PATH: install it (Debian/Ubuntu: `apt-get install prometheus`; "
                ".ci/run does) to run the Prometheus end-to-end test"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="tga-e2e-prometheus-"))
        self.port = free_port()
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log = open(self.dir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log_text()}"
            try:
                if requests.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        pytest.fail(f"prometheus not ready after 60 s:\n{self.log_text()}")

    def log_text(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")

    def query(self, expr: str) -> list[dict]:
        response = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None when it has no result yet."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, expected: float, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got == expected:
                return
            time.sleep(0.25)
        pytest.fail(f"Prometheus has {expr} = {got}, expected {expected}\n{self.log_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def prometheus_for():
    started = []

    def start(port: int) -> Prometheus:
        prom = Prometheus(port)
        started.append(prom)
        return prom

    yield start
    for prom in started:
        prom.stop()


def test_prometheus_scrapes_the_serving_metrics(spawn_server, prometheus_for):
    server = spawn_server()
    prom = prometheus_for(server.port)
    prom.wait_for(f'up{{job="{JOB}"}}', 1)

    prompt_tokens = completion_tokens = 0
    for i in range(3):
        result = server.chat([{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=5 + i, temperature=0)
        prompt_tokens += result["usage"]["prompt_tokens"]
        completion_tokens += result["usage"]["completion_tokens"]
    result = server.chat([user(image_part(data_uri("portrait_300x200.png")), "What is it?")], max_tokens=3)
    prompt_tokens += result["usage"]["prompt_tokens"]
    completion_tokens += result["usage"]["completion_tokens"]
    assert server.post({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).status_code == 404

    chat_ok = f'tga_requests_total{{job="{JOB}",route="{CHAT}",status="200"}}'
    prom.wait_for(chat_ok, 4)
    # Every value below is from the same scrape or a later one than the one that saw all 4 (the
    # server is idle now, so the counters no longer move).
    prom.wait_for(f'tga_requests_total{{route="{CHAT}",status="404"}}', 1)
    prom.wait_for('tga_requests_rejected_total{reason="model_not_found"}', 1)
    assert prom.value("tga_prompt_tokens_total") == prompt_tokens
    assert prom.value("tga_generation_tokens_total") == completion_tokens
    assert prom.value("tga_images_total") == 1
    assert prom.value("tga_image_tokens_total") == image_token_counts()[(300, 200)]
    assert prom.value("tga_request_duration_seconds_count") == 4
    assert prom.value("tga_time_to_first_token_seconds_count") == 4
    assert prom.value("tga_request_queue_time_seconds_count") == 4
    assert prom.value("tga_inter_token_latency_seconds_count") == completion_tokens - 4
    assert prom.value("tga_requests_running") == 0
    assert prom.value("tga_requests_waiting") == 0
    assert prom.value("tga_client_disconnects_total") == 0
    # Requests ran one at a time: one decode step of one sequence per token after the first.
    assert prom.value("tga_batch_size_count") == completion_tokens - 4
    assert prom.value("tga_batch_size_sum") == completion_tokens - 4
    assert prom.value(
        f'tga_model_info{{model="{BUILTIN_MODEL}",arch="llava_next",dtype="f32",device="cpu"}}'
    ) == 1
    # Histograms work with PromQL's own functions (buckets are cumulative and end in +Inf).
    p99 = prom.value("histogram_quantile(0.99, sum by (le) (tga_time_to_first_token_seconds_bucket))")
    assert p99 is not None and 0 < p99 < 2560
    assert prom.value('tga_time_to_first_token_seconds_bucket{le="+Inf"}') == 4
    # The paged KV cache: all blocks back in the pool once idle, the prefix cache asked.
    assert prom.value("tga_kv_cache_usage_ratio") == 0
    assert prom.value("tga_kv_cache_blocks_used") == 0
    assert prom.value("tga_kv_cache_blocks_free") > 0
    assert prom.value("tga_preemptions_total") == 0
    assert prom.value("tga_prefix_cache_queries_total") >= prom.value("tga_prefix_cache_hits_total") >= 0

    # The target is healthy and Prometheus knows each metric's type from the exposition.
    targets = requests.get(prom.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")], targets
    metadata = requests.get(prom.url + "/api/v1/metadata", timeout=10).json()["data"]
    expected_types = {
        "tga_requests_total": "counter",
        "tga_requests_running": "gauge",
        "tga_time_to_first_token_seconds": "histogram",
        "tga_batch_size": "histogram",
        "tga_model_info": "gauge",
        "tga_kv_cache_usage_ratio": "gauge",
        "tga_kv_cache_blocks_used": "gauge",
        "tga_preemptions_total": "counter",
        "tga_prefix_cache_hits_total": "counter",
    }
    for name, kind in expected_types.items():
        assert name in metadata and metadata[name][0]["type"] == kind, (name, metadata.get(name))
        assert metadata[name][0]["help"], name
