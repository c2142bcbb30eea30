"""Who may do what (issue 10): two users and an admin on every route, with their own rows, another
user's, no key, and keys that no longer work. Someone else's job is 404, never 403."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from storage.models import utcnow
from storage.notifications import Level
from tests.ray_app import RunningApp

SMALL = {"width": 64, "height": 64, "num_inference_steps": 4}


class People:
    def __init__(self, app: RunningApp) -> None:
        self.app = app
        self.ann = app.client(app.key_for("ann"))
        self.bob = app.client(app.key_for("bob"))
        self.admin = app.http
        self.nobody = app.client(None)
        self.garbage = app.client("seidra_0123456789ab_not-a-real-secret")
        revoked_key = app.key_for("ann")
        app.keys.revoke(revoked_key.split("_")[1])
        self.revoked = app.client(revoked_key)
        expired = app.keys.create("ann", expires_in_days=1, now=utcnow() - timedelta(days=2)).key
        self.expired = app.client(expired)

    def outsiders(self) -> dict[str, httpx.Client]:
        return {"none": self.nobody, "garbage": self.garbage, "revoked": self.revoked, "expired": self.expired}

    def close(self) -> None:
        for client in (self.ann, self.bob, self.nobody, self.garbage, self.revoked, self.expired):
            client.close()


@pytest.fixture(scope="module")
def people(app: RunningApp) -> Iterator[People]:
    crowd = People(app)
    try:
        yield crowd
    finally:
        crowd.close()


def submitted(client: httpx.Client, prompt: str, wait: bool = True) -> dict[str, Any]:
    response = client.post("/generation/single", params={"wait": wait}, json={"prompt": prompt, **SMALL})
    assert response.status_code in (200, 202), response.text
    return response.json()


@pytest.fixture(scope="module")
def jobs(people: People) -> dict[str, dict[str, Any]]:
    """A completed job of each user, and a batch of ann's."""
    ann, bob = submitted(people.ann, "ann's lighthouse"), submitted(people.bob, "bob's windmill")
    batch = people.ann.post("/generation/batch", json={"items": [{"prompt": "ann's batch", **SMALL}]})
    assert batch.status_code == 202, batch.text
    people.app.wait_for([ann["id"], bob["id"], *batch.json()["job_ids"]])
    return {"ann": ann, "bob": bob, "ann_batch": batch.json()}


def test_every_route_but_health_refuses_callers_without_a_working_key(people: People, jobs: dict[str, Any]) -> None:
    job_id = jobs["ann"]["id"]
    calls = [
        ("POST", "/generation/single", {"json": {"prompt": "x", **SMALL}}),
        ("POST", "/generation/batch", {"json": {"items": [{"prompt": "x", **SMALL}]}}),
        ("GET", f"/jobs/{job_id}", {}),
        ("GET", "/jobs", {}),
        ("GET", f"/jobs/{job_id}/image", {}),
        ("GET", f"/jobs/{job_id}/events", {}),
        ("DELETE", f"/jobs/{job_id}", {}),
        ("POST", f"/jobs/{job_id}/retry", {}),
        ("GET", "/notifications", {}),
        ("GET", "/status", {}),
        ("POST", "/admin/maintenance", {"json": {"enabled": False}}),
        ("POST", "/admin/lanes/batch", {"json": {"paused": False}}),
        ("POST", "/admin/faults", {"json": {}}),
        ("DELETE", "/admin/faults", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/docs", {}),
    ]
    count_before = len(people.app.jobs.list(limit=1000))
    for who, client in people.outsiders().items():
        for method, path, kwargs in calls:
            response = client.request(method, path, **kwargs)
            assert response.status_code == 401, (who, method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer", (who, method, path)
    assert len(people.app.jobs.list(limit=1000)) == count_before  # nothing stored
    assert people.nobody.get("/health").status_code == 200


def test_a_user_sees_and_touches_only_their_own_jobs(people: People, jobs: dict[str, Any]) -> None:
    ann_id, bob_id = jobs["ann"]["id"], jobs["bob"]["id"]
    # Own job: readable, its image downloadable; finished, so cancel and retry are conflicts.
    assert people.ann.get(f"/jobs/{ann_id}").status_code == 200
    assert people.ann.get(f"/jobs/{ann_id}/image").status_code == 200
    assert people.ann.get(f"/jobs/{ann_id}/events").text.rstrip().endswith("}")  # the end, then it closes
    assert people.ann.delete(f"/jobs/{ann_id}").status_code == 409
    assert people.ann.post(f"/jobs/{ann_id}/retry").status_code == 409
    # Another's: exactly as a job that does not exist.
    missing = "00000000-0000-4000-8000-000000000000"
    for path_of in (lambda j: f"/jobs/{j}", lambda j: f"/jobs/{j}/image", lambda j: f"/jobs/{j}/events"):
        other, absent = people.ann.get(path_of(bob_id)), people.ann.get(path_of(missing))
        assert other.status_code == absent.status_code == 404
        assert other.json()["detail"].replace(bob_id, "ID") == absent.json()["detail"].replace(missing, "ID")
    assert people.ann.delete(f"/jobs/{bob_id}").status_code == 404
    assert people.ann.post(f"/jobs/{bob_id}/retry").status_code == 404
    assert people.app.job(bob_id)["status"] == "completed"  # untouched


def test_cancelling_another_users_waiting_job_is_404_and_leaves_it_waiting(people: People, app: RunningApp) -> None:
    app.http.post("/admin/lanes/realtime", json={"paused": True}).raise_for_status()
    try:
        waiting = submitted(people.bob, "bob's waiting job", wait=False)
        assert people.ann.delete(f"/jobs/{waiting['id']}").status_code == 404
        assert people.ann.get(f"/jobs/{waiting['id']}/events").status_code == 404  # at once, not a stream
        assert people.ann.post(f"/jobs/{waiting['id']}/retry").status_code == 404
        assert app.job(waiting["id"])["status"] == "pending"
        assert people.bob.delete(f"/jobs/{waiting['id']}").json()["status"] == "cancelled"
    finally:
        app.http.post("/admin/lanes/realtime", json={"paused": False}).raise_for_status()


def test_lists_hold_only_the_callers_rows_and_owner_filters_are_for_admins(
    people: People, jobs: dict[str, Any], app: RunningApp
) -> None:
    ann_id, bob_id = jobs["ann"]["id"], jobs["bob"]["id"]
    listed = {who: {job["id"] for job in client.get("/jobs", params={"limit": 1000}).json()} for who, client in
              (("ann", people.ann), ("bob", people.bob), ("admin", people.admin))}  # fmt: skip
    assert ann_id in listed["ann"] and bob_id not in listed["ann"]
    assert bob_id in listed["bob"] and ann_id not in listed["bob"]
    assert {ann_id, bob_id} <= listed["admin"]
    batch_id = jobs["ann_batch"]["batch_id"]
    assert people.bob.get("/jobs", params={"batch_id": batch_id}).json() == []
    assert len(people.ann.get("/jobs", params={"batch_id": batch_id}).json()) == 1
    assert people.ann.get("/jobs", params={"owner": "bob"}).status_code == 403
    assert people.ann.get("/jobs", params={"owner": "ann"}).status_code == 200
    only_ann = people.admin.get("/jobs", params={"owner": "ann", "limit": 1000}).json()
    assert only_ann and {job["owner"] for job in only_ann} == {"ann"}

    app.notifier.notify(ann_id, Level.INFO, "for ann")
    app.notifier.notify(bob_id, Level.INFO, "for bob")
    assert {n["message"] for n in people.ann.get("/notifications").json()} >= {"for ann"}
    assert "for bob" not in {n["message"] for n in people.ann.get("/notifications").json()}
    assert people.bob.get("/notifications", params={"job_id": ann_id}).json() == []
    assert people.bob.get("/notifications", params={"owner": "ann"}).status_code == 403
    assert {n["message"] for n in people.admin.get("/notifications", params={"owner": "bob"}).json()} >= {"for bob"}


def test_image_urls_are_minted_for_the_owner_alone(people: People, jobs: dict[str, Any]) -> None:
    ann_id = jobs["ann"]["id"]
    assert people.ann.get(f"/jobs/{ann_id}").json()["image_url"]
    assert people.admin.get(f"/jobs/{ann_id}").json()["image_url"] is None
    assert people.admin.get(f"/jobs/{ann_id}/image").status_code == 200  # an admin fetches it through the API


def test_admin_routes_and_replica_details_are_for_admins(people: People) -> None:
    for method, path, body in [
        ("POST", "/admin/maintenance", {"enabled": False}),
        ("POST", "/admin/lanes/batch", {"paused": False}),
        ("POST", "/admin/faults", {}),
        ("DELETE", "/admin/faults", None),
    ]:
        assert people.ann.request(method, path, json=body).status_code == 403, path
        assert people.admin.request(method, path, json=body).status_code == 200, path
    mine = people.ann.get("/status").json()
    assert set(mine) == {"queues", "paused_lanes", "recovering", "jobs", "database"}
    assert sum(mine["jobs"].values()) == len(people.ann.get("/jobs", params={"limit": 1000}).json())
    assert "workers" in people.admin.get("/status").json()


def test_a_revoked_key_stops_working_within_seconds(app: RunningApp) -> None:
    key = app.key_for("dora")
    with app.client(key) as dora:
        assert dora.get("/jobs").status_code == 200
        app.keys.revoke(key.split("_")[1])
        deadline = time.monotonic() + 30
        while dora.get("/jobs").status_code == 200:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.2)
        assert dora.get("/jobs").status_code == 401


def test_quotas_refuse_with_429_and_retry_after(app: RunningApp) -> None:
    app.http.post("/admin/lanes/realtime", json={"paused": True}).raise_for_status()
    try:
        with app.client(app.key_for("erin", max_waiting_realtime=2)) as erin:
            held = [submitted(erin, f"erin {n}", wait=False)["id"] for n in range(2)]
            refused = erin.post("/generation/single", json={"prompt": "one too many", **SMALL})
            assert refused.status_code == 429, refused.text
            assert "limit per user is 2" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
            assert erin.post("/generation/batch", json={"items": [{"prompt": "b", **SMALL}]}).status_code == 202
            for job_id in held:
                erin.delete(f"/jobs/{job_id}").raise_for_status()
            assert erin.post("/generation/single", json={"prompt": "room again", **SMALL}).status_code == 202
        with app.client(app.key_for("fred", submissions_per_minute=2)) as fred:
            for n in range(2):
                submitted(fred, f"fred {n}", wait=False)
            refused = fred.post("/generation/single", json={"prompt": "too fast", **SMALL})
            assert refused.status_code == 429 and "2 submissions a minute" in refused.json()["detail"]
            assert 1 <= int(refused.headers["retry-after"]) <= 30
    finally:
        app.http.post("/admin/lanes/realtime", json={"paused": False}).raise_for_status()


def test_a_big_batch_does_not_keep_another_users_jobs_waiting(app: RunningApp) -> None:
    """Fair share: within the batch lane's priority, users take turns."""
    app.http.post("/admin/lanes/batch", json={"paused": True}).raise_for_status()
    try:
        with app.client(app.key_for("gina")) as gina, app.client(app.key_for("hugo")) as hugo:
            items = [{"prompt": f"gina {n}", **SMALL} for n in range(12)]
            big = gina.post("/generation/batch", json={"items": items}).json()["job_ids"]
            small = hugo.post("/generation/batch", json={"items": [{"prompt": f"hugo {n}", **SMALL} for n in range(3)]})
            small_ids = small.json()["job_ids"]
    finally:
        app.http.post("/admin/lanes/batch", json={"paused": False}).raise_for_status()
    finished = app.wait_for(big + small_ids)
    order = [job["id"] for job in sorted(finished, key=lambda job: job["started_at"])]
    assert max(order.index(job_id) for job_id in small_ids) <= 6, order  # turns: g h g h g h
