"""`zfarm submit` against a real redis-server: all or nothing, routed by size, idempotent, fair."""
from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from celery import Celery
from kombu import Connection

from farm import LosesOneReply, client_that_loses_one_reply
from producer.api import Farm, SubmitError
from producer.cli import main
from shared import keys, registry, routing, wire
from shared.ledger import Ledger
from shared.schema import Job
from shared.settings import Settings

SMALL_PX = 1024 * 1024
LARGE_PX = 2048 * 2048

# A measured table in which 8-16 GB classes render up to 1024x1024 and 24 GB and up 2048x2048, so
# that large jobs get their own tier ("c24") and small ones the shared one ("any").
TIERED_TABLE = {"runs": [
    {"profile": "offload", "ok": True, "s_per_image": 12.0, "peak_reserved_gib": 6.0, "cap_gib": 7.0,
     "host_rss_gib": 20.0, "max_pixels": SMALL_PX},
    {"profile": "resident", "ok": True, "s_per_image": 3.0, "peak_reserved_gib": 20.0, "cap_gib": 23.0,
     "host_rss_gib": 10.0, "max_pixels": LARGE_PX},
], "source": "test"}


@pytest.fixture
def table_path(tmp_path, monkeypatch):
    path = tmp_path / "profile_table.json"
    path.write_text(json.dumps(TIERED_TABLE))
    monkeypatch.setenv("ZFARM_PROFILE_TABLE", str(path))
    return path


@pytest.fixture
def cli(redis_server, capsys):
    """Run `zfarm --redis-url <test redis> ...`; returns (exit code, stdout, stderr)."""
    def run(*args):
        code = main(["--redis-url", redis_server, *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def farm_for(redis_url: str, client=None, **settings) -> Farm:
    return Farm(Settings.from_env(redis_url=redis_url, **settings), redis_client=client, table=TIERED_TABLE)


def zfarm_queues(client) -> dict[str, int]:
    return {q.decode(): client.llen(q) for q in client.keys("zfarm.*")}


def register_worker(client, name: str, vram_class, max_pixels: int) -> None:
    registry.register(client, {"name": name, "host": "test-host", "gpu": "fake", "vram_gb": 8.0,
                               "vram_class": vram_class, "profile": "offload", "max_pixels": max_pixels},
                      ttl_s=60)


def write_jobs(tmp_path, lines: list[dict], name: str = "p.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


# All or nothing
def test_a_bad_file_queues_nothing_at_all(cli, tmp_path, redis_client):
    path = write_jobs(tmp_path, [{"prompt": "fine"}] * 50 + [{"prompt": "x", "steps": 0}])
    code, out, err = cli("submit", path)
    assert code == 2 and out == ""
    assert f"{path}:51: steps" in err
    assert redis_client.dbsize() == 0


def test_a_refused_oversized_job_queues_nothing(cli, tmp_path, redis_client, table_path):
    register_worker(redis_client, "small-1", 8, SMALL_PX)
    path = write_jobs(tmp_path, [{"prompt": "small", "width": 512, "height": 512},
                                 {"prompt": "huge", "width": 2048, "height": 2048}])
    before = set(redis_client.keys("*"))
    code, out, err = cli("submit", path)
    assert code == 2 and out == ""
    assert set(redis_client.keys("*")) == before  # only the fake worker's registration
    assert zfarm_queues(redis_client) == {}


# A good file
def test_a_good_file_queues_one_message_per_job_in_its_size_tier(cli, tmp_path, redis_client, table_path):
    path = write_jobs(tmp_path, [{"prompt": f"small {i}", "width": 512, "height": 512} for i in range(3)]
                      + [{"prompt": "large", "width": 2048, "height": 2048}])
    code, out, err = cli("submit", path, "--priority", "high", "--json")
    assert code == 0, err
    result = json.loads(out)
    batch_id = result["batch_id"]
    lane = int(redis_client.hget(keys.batch_meta(batch_id), "lane"))
    assert result["jobs"] == 4
    assert zfarm_queues(redis_client) == {routing.queue("high", "any", lane): 3, routing.queue("high", "c24", lane): 1}
    assert result["queues"] == zfarm_queues(redis_client)
    status = Ledger(redis_client).status(batch_id)
    assert (status["total"], status["queued"], status["queued_by_tier"]) == (4, 4, {"any": 3, "c24": 1})
    assert status["meta"]["source"] == "p.jsonl"


def test_the_last_stdout_line_of_submit_is_the_batch_id(cli, tmp_path, redis_client):
    path = tmp_path / "p.txt"
    path.write_text("a fox\nan owl\n")
    code, out, err = cli("submit", path)
    batch_id = out.splitlines()[-1]
    assert code == 0 and redis_client.exists(keys.batch_meta(batch_id))
    assert "no worker is live" in err


def test_queued_messages_are_celery_envelopes_kombu_decodes(cli, tmp_path, redis_server, table_path):
    path = write_jobs(tmp_path, [{"prompt": "small", "width": 512, "height": 512, "steps": 4, "seed": 5},
                                 {"prompt": "large", "width": 2048, "height": 2048, "seed": 6}])
    code, out, _ = cli("submit", path, "--json")
    batch_id = json.loads(out)["batch_id"]
    # The headers Celery itself writes for a protocol-2 task, so a worker's strategy accepts ours.
    celery_headers = set(Celery(broker="memory://").amqp.as_task_v2(
        "id", "zfarm.render", args=(), kwargs={"job": {}}).headers)
    seen = {}
    with Connection(redis_server) as conn:
        channel = conn.default_channel
        for queue in json.loads(out)["queues"]:
            message = channel.basic_get(queue, no_ack=True)
            args, kwargs, embed = message.decode()
            job = Job.from_wire(kwargs["job"])
            assert args == [] and set(embed) == {"callbacks", "errbacks", "chain", "chord"}
            assert celery_headers <= set(message.headers)
            assert message.headers["task"] == "zfarm.render" and message.headers["id"] == job.id
            assert message.properties["delivery_info"]["routing_key"] == queue
            hard_s, soft_s = message.headers["timelimit"]
            assert hard_s == routing.job_time_limit_s(job.spec.pixels, job.spec.steps, TIERED_TABLE, 3.0)
            assert soft_s == hard_s - 10
            seen[job.spec.prompt] = (job.batch_id, job.tier, job.spec.seed)
    assert seen == {"small": (batch_id, "any", 5), "large": (batch_id, "c24", 6)}


def test_a_worker_blocked_on_several_queues_is_handed_the_larger_tier_first(redis_server, redis_client):
    farm = Farm(Settings.from_env(redis_url=redis_server, lanes=1), table=TIERED_TABLE)
    large, small = routing.queue("normal", "c24", 0), routing.queue("normal", "any", 0)
    popped = []
    blocked = redis.Redis.from_url(redis_server)
    waiter = threading.Thread(target=lambda: popped.append(blocked.brpop([large, small], timeout=10)))
    waiter.start()
    deadline = time.monotonic() + 10
    while redis_client.info("clients")["blocked_clients"] < 1:
        assert time.monotonic() < deadline, "the BRPOP client never blocked"
        time.sleep(0.01)
    # The small job comes first in the batch; the large one must still reach the blocked worker.
    farm.submit([{"prompt": "small", "width": 512, "height": 512},
                 {"prompt": "large", "width": 2048, "height": 2048}])
    waiter.join(10)
    blocked.close()
    assert popped and popped[0][0].decode() == large


# Idempotency
@pytest.mark.parametrize("option", [["--idempotency-key", "nightly-2024-06-01"], ["--name", "nightly"]])
def test_resubmitting_with_the_same_key_or_name_returns_the_first_batch(cli, tmp_path, redis_client, option):
    path = tmp_path / "p.txt"
    path.write_text("a fox\nan owl\n")
    code, first, _ = cli("submit", path, *option)
    assert code == 0
    queues = zfarm_queues(redis_client)
    code, second, err = cli("submit", path, *option)
    assert code == 0 and second == first
    assert "already submitted" in err
    assert zfarm_queues(redis_client) == queues
    assert redis_client.zcard(keys.BATCHES) == 1


def test_a_submit_whose_reply_is_lost_is_retried_without_queueing_any_job_twice(redis_server, redis_client):
    register_worker(redis_client, "small-1", 8, SMALL_PX)
    retrying = client_that_loses_one_reply(redis_server)
    LosesOneReply.armed = b"EXEC"
    batch = farm_for(redis_server, client=retrying).submit(["a fox", "a hen", "a cat"])
    assert LosesOneReply.armed == b""  # the transaction ran, its reply was lost, and the client retried
    messages = [m for q in redis_client.keys("zfarm.*") for m in redis_client.lrange(q, 0, -1)]
    assert sorted(wire.envelope_task_id(m) for m in messages) == [f"{batch.id}-{i:06d}" for i in range(3)]
    assert batch.status()["total"] == batch.status()["queued"] == 3
    retrying.close()


def test_different_names_make_different_batches(cli, tmp_path, redis_client):
    path = tmp_path / "p.txt"
    path.write_text("a fox\n")
    assert cli("submit", path, "--name", "one")[1] != cli("submit", path, "--name", "two")[1]
    assert redis_client.zcard(keys.BATCHES) == 2


def test_concurrent_submits_with_one_key_create_one_batch(redis_server, redis_client):
    barrier = threading.Barrier(4)
    ids = []

    def submit():
        farm = farm_for(redis_server)
        barrier.wait()
        ids.append(farm.submit(["a fox"] * 20, idempotency_key="same").id)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and redis_client.zcard(keys.BATCHES) == 1
    assert sum(zfarm_queues(redis_client).values()) == 20


# Refusal and pending jobs
def test_a_job_larger_than_every_live_worker_is_refused_by_line_size_and_classes(cli, tmp_path, redis_client,
                                                                                   table_path):
    register_worker(redis_client, "small-1", 8, SMALL_PX)
    register_worker(redis_client, "small-2", 12, SMALL_PX)
    path = write_jobs(tmp_path, [{"prompt": "fits", "width": 1024, "height": 1024},
                                 {"prompt": "huge", "width": 2048, "height": 1536}])
    code, out, err = cli("submit", path)
    assert code == 2
    line = err.strip()
    assert len(err.strip().splitlines()) == 1, err
    assert "p.jsonl:2 is 2048x1536 (3145728 px)" in line
    assert "8g 1048576 px" in line and "12g 1048576 px" in line
    assert "--allow-pending" in line


def test_the_api_names_jobs_by_index_when_they_come_from_no_file(redis_server, redis_client):
    register_worker(redis_client, "small-1", 8, SMALL_PX)
    with pytest.raises(SubmitError, match=r"job 1 \(item 2\) is 2048x2048"):
        farm_for(redis_server).submit([{"prompt": "ok"}, {"prompt": "big", "width": 2048, "height": 2048}])


def test_with_no_live_worker_nothing_is_refused(redis_server, redis_client):
    batch = farm_for(redis_server).submit([{"prompt": "big", "width": 2048, "height": 2048}])
    assert batch.created and batch.live_workers == 0


def test_allow_pending_queues_large_jobs_and_status_shows_them_waiting(cli, tmp_path, redis_client, table_path):
    register_worker(redis_client, "small-1", 8, SMALL_PX)
    path = write_jobs(tmp_path, [{"prompt": "fits", "width": 1024, "height": 1024},
                                 {"prompt": "huge", "width": 2048, "height": 2048},
                                 {"prompt": "huge too", "width": 2048, "height": 2048}])
    code, out, err = cli("submit", path, "--allow-pending")
    assert code == 0, err
    assert "2 job(s) wait for a worker larger than any live one" in err
    batch_id = out.splitlines()[-1]
    code, out, _ = cli("status", batch_id, "--json")
    status = json.loads(out)
    assert (status["queued"], status["waiting_for_worker"], status["total"]) == (1, 2, 3)

    register_worker(redis_client, "large-1", 24, LARGE_PX)  # a capable worker arrives
    status = json.loads(cli("status", batch_id, "--json")[1])
    assert (status["queued"], status["waiting_for_worker"]) == (3, 0)


# Lanes
def test_two_batches_submitted_together_land_in_different_lanes(redis_server, redis_client):
    barrier = threading.Barrier(2)
    batches = []

    def submit(prompt):
        farm = farm_for(redis_server)
        barrier.wait()
        batches.append(farm.submit([prompt] * 10))

    threads = [threading.Thread(target=submit, args=(p,)) for p in ("a fox", "an owl")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queues = [set(b.queues) for b in batches]
    assert len(queues[0]) == len(queues[1]) == 1 and queues[0] != queues[1]
    assert sorted(zfarm_queues(redis_client).values()) == [10, 10]


def test_a_new_batch_takes_the_least_loaded_lane(redis_server, redis_client):
    farm = farm_for(redis_server, lanes=3)
    lanes = [int(farm.submit(["x"] * n).status()["meta"]["lane"]) for n in (30, 20, 10)]
    assert sorted(lanes) == [0, 1, 2]
    fourth = farm.submit(["x"])
    assert fourth.queues == {routing.queue("normal", "any", lanes[2]): 1}  # the lane holding 10


# Status
class CountingConnection(redis.Connection):
    """Counts what the client sends: one send per command, or per pipeline execution."""
    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def status_cost(redis_url: str, admin, batch_id: str) -> tuple[int, dict]:
    """(round trips, {command: calls} seen by the server) of one status call."""
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    farm = farm_for(redis_url, client=client)
    client.ping()  # connect (and say HELLO) before counting
    admin.config_resetstat()
    CountingConnection.sends = 0
    status = farm.batch(batch_id).status()
    sends = CountingConnection.sends
    stats = {k: v["calls"] for k, v in admin.info("commandstats").items() if not k.startswith("cmdstat_config")}
    assert status["batch_id"] == batch_id
    return sends, stats


def test_status_is_one_round_trip_whatever_the_batch_size(redis_server, redis_client):
    register_worker(redis_client, "small-1", 8, SMALL_PX)
    farm = farm_for(redis_server)
    small, large = farm.submit(["x"]), farm.submit(["x"] * 2000)
    Ledger(redis_client).finish(large.id, 5, "failed", {"kind": "render-error", "message": "boom"})
    small_cost, large_cost = status_cost(redis_server, redis_client, small.id), \
        status_cost(redis_server, redis_client, large.id)
    assert small_cost[0] == large_cost[0] == 1
    assert small_cost[1] == large_cost[1]  # no command per job, nor per failure
    assert small_cost[1]["cmdstat_hgetall"] == 3


# Cancel
def test_cancel_counts_the_jobs_not_yet_started(cli, redis_server, redis_client):
    batch = farm_for(redis_server).submit(["x"] * 5)
    ledger = Ledger(redis_client)
    job = Job.from_wire(ledger.jobs(batch.id)[0])
    assert ledger.start(job, "worker-1") == "run"
    code, out, err = cli("cancel", batch.id)
    assert (code, out.strip()) == (0, "4")
    assert "cancelled 4 queued job(s)" in err
    status = batch.status()
    assert (status["cancelled"], status["running"], status["queued"], status["waiting_for_worker"]) == (4, 1, 0, 0)
    assert cli("cancel", batch.id)[1].strip() == "0"  # cancelling twice cancels nothing more


def test_an_unknown_batch_is_a_one_line_error(cli):
    code, out, err = cli("status", "20240101-000000-abcdef")
    assert code == 2 and err == "zfarm: no batch 20240101-000000-abcdef\n"
    code, out, err = cli("cancel", "../etc")
    assert code == 2 and err.startswith("zfarm: batch_id: must match") and "Traceback" not in err


def test_an_unreachable_redis_is_a_one_line_error_without_the_password(tmp_path, capsys, free_port):
    path = tmp_path / "p.txt"
    path.write_text("a fox\n")
    code = main(["--redis-url", f"redis://:hunter2@127.0.0.1:{free_port}/0", "status", "20240101-000000-abcdef"])
    err = capsys.readouterr().err
    assert code == 3 and len(err.splitlines()) == 1
    assert "hunter2" not in err and "***" in err
