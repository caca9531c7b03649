"""Webhooks reach public addresses only, unless an operator allows a private network: checked when a
batch is submitted (here) and again when a worker sends (tests below the send section)."""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from farm import wait_for
from producer.api import Farm, SubmitError
from producer.cli import main
from shared.settings import Settings, SettingsError
from shared.webhook_policy import WebhookRefused, check_url, parse_allowed_networks
from worker.webhooks import deliver, post_json

SIMULATE = ("--simulate", "0.05")


def refused_because(url: str, allowed: str = "") -> str:
    with pytest.raises(WebhookRefused) as caught:
        check_url(url, parse_allowed_networks(allowed))
    return str(caught.value)


# The policy
@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:6379/", "loopback"),
    ("http://localhost:8080/hook", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://2130706433/", "loopback"),           # 127.0.0.1 written as one number
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://169.254.10.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://10.0.0.5/", "private"),
    ("http://192.168.1.20:9000/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://100.64.0.1/", "not a public address"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
])
def test_a_webhook_to_a_non_public_address_is_refused_by_default(url, why):
    assert why in refused_because(url)


@pytest.mark.parametrize("url, why", [
    ("ftp://example.com/x", "http or https only"),
    ("file:///etc/passwd", "http or https only"),
    ("gopher://127.0.0.1:6379/_SET", "http or https only"),
    ("http:///no-host", "names no host"),
    ("http://example.com:99999/", "not a URL"),
    ("http://no-such-host.invalid/", "cannot be resolved"),
    ("http://example.com/" + "x" * 2000, "at most 2000 characters"),
])
def test_a_webhook_that_is_not_an_http_url_to_a_known_host_is_refused(url, why):
    assert why in refused_because(url)


def test_a_public_address_is_accepted_and_its_message_never_shows_the_query():
    target = check_url("https://93.184.216.34:8443/hooks/done?token=s3cret")
    assert (target.scheme, target.host, target.port, target.target, target.addresses) == (
        "https", "93.184.216.34", 8443, "/hooks/done?token=s3cret", ("93.184.216.34",))
    assert "s3cret" not in refused_because("http://127.0.0.1/hooks?token=s3cret")


def test_a_name_resolving_to_a_private_address_beside_a_public_one_is_refused():
    def resolve(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
                for address in ("93.184.216.34", "10.1.2.3")]

    with pytest.raises(WebhookRefused, match="hooks.example.com resolves to 10.1.2.3, which is a private address"):
        check_url("http://hooks.example.com/done", resolve=resolve)


def test_the_allow_list_lets_a_private_hook_through_but_never_a_metadata_address():
    assert check_url("http://127.0.0.1:8080/", parse_allowed_networks("127.0.0.0/8")).addresses == ("127.0.0.1",)
    assert check_url("http://10.0.0.5/", parse_allowed_networks(" 192.168.0.0/16, 10.0.0.5 ")).port == 80
    assert "private" in refused_because("http://10.0.0.6/", "10.0.0.5")
    assert "metadata" in refused_because("http://169.254.169.254/", "169.254.0.0/16")


def test_an_allow_list_entry_that_is_no_network_is_a_settings_error_naming_the_variable():
    with pytest.raises(SettingsError, match="ZFARM_WEBHOOK_ALLOWED_NETWORKS: 'intranet'"):
        parse_allowed_networks("10.0.0.0/8,intranet")


# At submit
def test_zfarm_submit_refuses_a_webhook_to_the_redis_port_and_queues_nothing(redis_server, redis_client, tmp_path,
                                                                           capsys):
    path = tmp_path / "p.txt"
    path.write_text("a fox\n")
    port = redis_client.connection_pool.connection_kwargs["port"]
    code = main(["--redis-url", redis_server, "submit", str(path), "--webhook", f"http://127.0.0.1:{port}/"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == ("zfarm: webhook refused: 127.0.0.1 is a loopback address; ZFARM_WEBHOOK_ALLOWED_NETWORKS "
                   "lists private networks hooks may reach; nothing was queued\n")
    assert redis_client.keys("zfarm*") == []


def test_a_producer_whose_allow_list_names_the_network_accepts_the_private_hook(redis_server, redis_client,
                                                                               monkeypatch):
    monkeypatch.setenv("ZFARM_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    farm = Farm.from_env(redis_url=redis_server, table={"runs": []})
    batch = farm.submit(["a fox"], webhook="http://127.0.0.1:8080/done")
    assert batch.status()["meta"]["webhook"] == "http://127.0.0.1:8080/done"
    other = Farm(Settings.from_env({}, redis_url=redis_server), table={"runs": []})
    with pytest.raises(SubmitError, match="metadata"):
        other.submit(["a fox"], webhook="http://169.254.169.254/")


# At send
class _Hook(BaseHTTPRequestHandler):
    paths: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.paths.append(self.path)
        if self.path == "/moved":  # a redirect into somewhere else must not be followed
            self.send_response(307)
            self.send_header("Location", "/elsewhere")
        else:
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook_server():
    _Hook.paths = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_the_worker_checks_again_before_posting_and_never_calls_a_loopback_hook(
        start_worker, farm_factory, file_storage_url, hook_server, monkeypatch):
    # A producer allowed loopback hooks; the worker, as by default, allows none.
    monkeypatch.setenv("ZFARM_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    worker = start_worker(file_storage_url, SIMULATE, ZFARM_WEBHOOK_ALLOWED_NETWORKS="")
    batch = farm_factory(file_storage_url).submit(["one"], webhook=f"{hook_server}/done?token=s3cret")
    refused = f"webhook for batch {batch.id} refused, not sent: 127.0.0.1 is a loopback address"
    wait_for(lambda: refused in worker.output(), 60, what="the worker to refuse the webhook")
    assert _Hook.paths == [] and "s3cret" not in worker.output()


def test_a_checked_post_connects_to_the_checked_address_and_follows_no_redirect(hook_server):
    allowed = parse_allowed_networks("127.0.0.1/32")
    assert post_json(f"{hook_server}/done", {"batch_id": "b"}, 5, allowed) == 200
    assert post_json(f"{hook_server}/moved", {"batch_id": "b"}, 5, allowed) == 307
    assert _Hook.paths == ["/done", "/moved"]
    assert deliver(f"{hook_server}/done", {"batch_id": "b"}, 5, tries=1, allowed_networks=()) is False
    assert _Hook.paths == ["/done", "/moved"]
