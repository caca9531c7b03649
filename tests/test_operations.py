"""Operating the farm: scaling advice from the live queue and fleet; completion webhooks."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from farm import wait_for
from farm_fixtures import TEST_TABLE
from producer.cli import main
from shared import registry

SIMULATE = ("--simulate", "0.05")


@pytest.fixture
def table_env(monkeypatch, redis_server, tmp_path):
    monkeypatch.setenv("ZFARM_PROFILE_TABLE", str(TEST_TABLE))
    monkeypatch.setenv("ZFARM_REDIS_URL", redis_server)
    monkeypatch.setenv("ZFARM_STORAGE_URL", f"file://{tmp_path / 'results'}")


def test_scale_advice_reports_the_drain_time_and_the_workers_to_add_for_a_deadline(
        table_env, farm_factory, redis_client, file_storage_url, capsys):
    registry.register(redis_client, {"name": "w12@box", "vram_class": 12, "max_pixels": 1024 * 1024,
                                     "s_per_image_measured": 2.0, "state": "ready"}, ttl_s=60)
    farm = farm_factory(file_storage_url)
    farm.submit([{"prompt": f"p{i}", "width": 1024, "height": 1024} for i in range(900)])
    assert main(["scale-advice", "--deadline", "15m", "--json"]) == 0
    advice = json.loads(capsys.readouterr().out)
    # 900 reference images at 2 s each: 30 minutes with one 12 GB card; a 15 minute deadline needs
    # another 12 GB card or a 24 GB one (1 s per image).
    assert advice["remaining_jobs"] == 900 and advice["expected_finish_s"] == pytest.approx(1800)
    assert advice["meets_deadline"] is False and advice["add"]["12"] == 1 and advice["add"]["24"] == 1
    assert main(["scale-advice", "--deadline", "2h"]) == 0
    text = capsys.readouterr().out
    assert "expected to finish in 30m00s" in text and "meets the 2h00m deadline" in text


class _Hook(BaseHTTPRequestHandler):
    calls: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Hook.calls.append(body)
        # The first call fails: the worker must try again.
        self.send_response(500 if len(_Hook.calls) == 1 else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_finished_batch_calls_its_webhook_with_the_status_retrying_a_failed_call(
        start_worker, farm_factory, file_storage_url, monkeypatch):
    _Hook.calls = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The hook listens on loopback, which webhooks may reach only when the operator allows it.
    monkeypatch.setenv("ZFARM_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.1/32")
    try:
        start_worker(file_storage_url, SIMULATE, ZFARM_WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32")
        farm = farm_factory(file_storage_url)
        batch = farm.submit(["one", "two"], webhook=f"http://127.0.0.1:{server.server_port}/done")
        wait_for(lambda: len(_Hook.calls) >= 2, 60, what="the webhook to be retried and delivered")
        assert _Hook.calls[-1]["batch_id"] == batch.id and _Hook.calls[-1]["done"] == 2
    finally:
        server.shutdown()
