"""The labeling app over HTTP: logins, CSRF, access control, escaping, the no-JS form, the admin page, and 8
concurrent labelers against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import random
import re
import threading
import time
from html import escape

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import live_server, write_jsonl
from instructgpt import data
from instructgpt.labeling.app import LOOPBACK_HOSTS, create_app
from instructgpt.labeling.formats import export, import_prompts
from instructgpt.labeling.store import Store

PASSWORD = "correct horse battery"
XSS = '<script>alert("xss")</script>"><img src=x onerror=alert(1)>'


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client, username: str, password: str = PASSWORD):
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token},
                       follow_redirects=False)


def ranking_form(html: str, ranks: list[int], ratings: list[int], flags=None) -> dict:
    """What the no-JS form posts: fields are named by the response's position in the task."""
    k = int(re.search(r'data-k="(\d+)"', html).group(1))
    form = {"csrf_token": csrf_of(html)}
    for i in range(k):
        form[f"rank_{i}"] = str(ranks[i])
        form[f"rating_{i}"] = str(ratings[i])
        if flags and flags[i]:
            form[f"flag_{i}"] = flags[i]
    return form


@pytest.fixture
def setup(tmp_path):
    """A store with a labeler pair, an admin, two ranking tasks (overlap 2) and one demonstration task."""
    store = Store(str(tmp_path / "labels.sqlite"))
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"Rank these {XSS}", "responses": ["first", f"second {XSS}", "third"]},
        {"prompt": "Rank again", "responses": ["uno", "dos", "tres"]},
        {"prompt": f"Write something {XSS}"},
    ])
    import_prompts(store, prompts, overlap=2)
    for name in ("ann", "bob"):
        store.add_user(name, PASSWORD)
    store.add_user("root", PASSWORD, is_admin=True)
    return store


def client_for(store: Store, username: str | None = None) -> TestClient:
    c = TestClient(create_app(store))
    if username:
        assert login(c, username).status_code == 303
    return c


def submissions(store: Store) -> list[dict]:
    return list(store.iter_submissions())


# ----------------------------------------------------------------------------------------------------------------
# Accounts and CSRF


def test_wrong_password_and_unknown_user_are_refused(setup):
    c = client_for(setup)
    for user, pw in (("ann", "not the password"), ("nobody", PASSWORD)):
        r = login(c, user, pw)
        assert r.status_code == 401 and "Wrong username or password" in r.text
        assert "igpt_session" not in r.cookies
    assert c.get("/next", follow_redirects=False).headers["location"] == "/login"
    r = login(c, "ann")
    assert r.status_code == 303 and "igpt_session" in r.cookies
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert c.get("/next").url.path == "/task/1"


def test_failed_logins_lock_the_account_for_a_while(setup):
    from instructgpt.labeling.security import LoginThrottle

    now = [0.0]
    c = TestClient(create_app(setup, login_throttle=LoginThrottle({"user": 5, "addr": 20}, window=900,
                                                                  clock=lambda: now[0])))
    for _ in range(5):
        assert login(c, "ann", "not the password").status_code == 401
    r = login(c, "ann")  # the right password, but locked: refused before it is checked
    assert r.status_code == 429 and "Too many failed logins: try again in 15 minutes." in r.text
    assert r.headers["retry-after"] == "900" and "igpt_session" not in r.cookies
    assert login(c, "ANN").status_code == 429  # the same account whatever the case typed
    assert login(c, "bob").status_code == 303  # other accounts from the same client still log in
    c.cookies.clear()  # bob's session out of the way
    now[0] += 901
    assert login(c, "ann").status_code == 303


def test_login_needs_its_csrf_token(setup):
    c = client_for(setup)
    c.get("/login")  # sets the login CSRF cookie
    r = c.post("/login", data={"username": "ann", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": "forged"},
               follow_redirects=False)
    assert r.status_code == 403


def test_every_post_needs_the_session_csrf_token(setup):
    c = client_for(setup, "ann")
    page = c.get("/next")
    good = ranking_form(page.text, [1, 2, 3], [5, 5, 5])
    for missing in ({k: v for k, v in good.items() if k != "csrf_token"}, {**good, "csrf_token": "forged"}):
        for url in ("/task/1", "/task/1/skip", "/logout"):
            r = c.post(url, data=missing, follow_redirects=False)
            assert r.status_code == 403, url
    # A page of another origin cannot post even with a stolen token.
    r = c.post("/task/1", data=good, headers={"Origin": "http://evil.example"}, follow_redirects=False)
    assert r.status_code == 403
    assert submissions(setup) == [] and c.get("/task/1").status_code == 200  # still logged in, nothing stored
    r = c.post("/task/1", data=good, follow_redirects=False)
    assert r.status_code == 303 and len(submissions(setup)) == 1
    # Not a form at all.
    assert c.post("/task/2", json=good).status_code == 415


def test_logout_ends_the_session(setup):
    c = client_for(setup, "ann")
    token = csrf_of(c.get("/next").text)
    assert c.post("/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    assert c.get("/next", follow_redirects=False).headers["location"] == "/login"


def test_a_disabled_labeler_is_logged_out_at_once_and_cannot_log_in(setup):
    c = client_for(setup, "ann")
    assert c.get("/next").url.path == "/task/1"
    setup.set_disabled("ann", True)
    assert c.get("/next", follow_redirects=False).headers["location"] == "/login"  # the live cookie no longer works
    r = login(client_for(setup), "ann")
    assert r.status_code == 401 and "igpt_session" not in r.cookies
    admin = client_for(setup, "root")
    assert "(disabled)" in admin.get("/admin").text
    setup.set_disabled("ann", False)
    assert login(client_for(setup), "ann").status_code == 303


def test_host_header_is_checked_when_bound_to_loopback(setup):
    c = TestClient(create_app(setup, allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:8765")
    assert c.get("/login").status_code == 200
    assert c.get("/login", headers={"Host": "localhost:8765"}).status_code == 200
    assert c.get("/login", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding


# ----------------------------------------------------------------------------------------------------------------
# Access control and escaping


def test_a_labeler_cannot_read_or_submit_anothers_task(setup):
    ann, bob = client_for(setup, "ann"), client_for(setup, "bob")
    assert ann.get("/next").url.path == "/task/1"
    # bob has not been given task 3 (nor anything yet): reading or posting it is a 404, and nothing is stored.
    r = bob.get("/task/3")
    assert r.status_code == 404 and "Write something" not in r.text
    token = csrf_of(r.text)
    r = bob.post("/task/3", data={"csrf_token": token, "response": "sneaky"}, follow_redirects=False)
    assert r.status_code == 404
    assert bob.post("/task/3/skip", data={"csrf_token": token}).status_code == 404
    assert submissions(setup) == []
    assert bob.get("/admin").status_code == 403
    assert bob.get("/task/999").status_code == 404
    anon = client_for(setup)
    assert anon.get("/task/1", follow_redirects=False).headers["location"] == "/login"
    assert anon.get("/admin", follow_redirects=False).headers["location"] == "/login"


def test_untrusted_text_is_escaped_everywhere(setup):
    c = client_for(setup, "ann")
    page = c.get("/next")
    assert page.url.path == "/task/1"
    assert "<script>alert" not in page.text and "<img src=x" not in page.text
    assert escape("<script>alert(") in page.text.replace("&#34;", "&quot;")
    assert page.text.count("&lt;script&gt;") >= 3  # the prompt, the output, and its preview in the ranking list
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    # Values sent back into a re-shown form are escaped too.
    form = ranking_form(page.text, [1, 2, 3], [5, 5, 5])
    form["rank_0"] = XSS
    r = c.post("/task/1", data=form)
    assert r.status_code == 400 and "whole number" in r.text
    assert "<script>alert" not in r.text and "<img src=x" not in r.text
    # The demonstration task, and a demonstration containing markup, are stored verbatim and shown escaped.
    c.post("/task/1", data=ranking_form(page.text, [1, 2, 3], [5, 5, 5]))
    c.post("/task/2", data=ranking_form(c.get("/task/2").text, [1, 2, 3], [5, 5, 5]))
    page = c.get("/next")
    assert page.url.path == "/task/3" and "<script>alert" not in page.text
    c.post("/task/3", data={"csrf_token": csrf_of(page.text), "response": XSS})
    assert [s["response"] for s in submissions(setup) if s["kind"] == "demonstration"] == [XSS]


def test_pages_use_no_outside_resources(setup):
    c = client_for(setup, "ann")
    for path in ("/login", "/next"):
        html = c.get(path).text
        assert not re.search(r'(src|href)="(https?:)?//', html), path
    for name, ctype in (("app.js", "javascript"), ("app.css", "text/css")):
        r = c.get(f"/static/{name}")
        assert r.status_code == 200 and ctype in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text
    assert c.get("/static/../store.py").status_code == 404


# ----------------------------------------------------------------------------------------------------------------
# The form (also what a browser without JavaScript posts)


def test_ranking_form_validation_ties_and_double_submit(setup):
    c = client_for(setup, "ann")
    page = c.get("/next")
    assert "Task <strong>1</strong> of 3" in page.text
    form = ranking_form(page.text, [1, 3, 3], [6, 2, 2], flags=[[], ["hallucination", "expresses_opinion"], []])
    del form["rating_1"]
    r = c.post("/task/1", data=form)
    assert r.status_code == 400 and "needs a rating" in r.text
    assert re.search(r'name="rating_0" value="6" required checked', r.text)  # what was entered is kept
    form["rating_1"] = "2"
    r = c.post("/task/1", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/next?submitted=1"
    assert c.post("/task/1", data=form, follow_redirects=False).status_code == 303  # a double click: no error...
    [s] = submissions(setup)  # ...and no second row
    assert s["ranks"] == [1, 2, 2] and s["ratings"] == [6, 2, 2]  # dense ranks, ties kept
    assert s["flags"] == [[], ["hallucination", "expresses_opinion"], []]
    page = c.get("/next")
    assert page.url.path == "/task/2" and "Task <strong>2</strong> of 3" in page.text
    # Skipping: the task leaves the queue for good.
    assert c.post("/task/2/skip", data={"csrf_token": csrf_of(page.text)}).url.path == "/task/3"
    assert c.get("/task/2", follow_redirects=False).headers["location"] == "/next"
    r = c.post("/task/3", data={"csrf_token": csrf_of(page.text), "response": "   "})
    assert r.status_code == 400 and "empty" in r.text
    r = c.post("/task/3", data={"csrf_token": csrf_of(page.text), "response": "A fine answer.\r\n"})
    assert "All caught up" in r.text and "skipped 1" in r.text
    assert submissions(setup)[-1]["response"] == "A fine answer."


def test_admin_sees_progress_and_agreement(setup):
    for name, ranks in (("ann", [1, 2, 3]), ("bob", [1, 3, 2])):
        c = client_for(setup, name)
        for task in (1, 2):
            page = c.get("/next")
            assert page.url.path == f"/task/{task}"
            assert c.post(f"/task/{task}", data=ranking_form(page.text, ranks, [4, 4, 4]),
                          follow_redirects=False).status_code == 303
    admin = client_for(setup, "root")
    page = admin.get("/")
    assert page.url.path == "/admin"
    # Per task: pairs (0,1) and (0,2) agree, (1,2) does not -> 2/3 on each of 2 tasks.
    assert "66.7 ± 0.0%" in page.text
    assert "<strong>66.7%</strong> over 6 comparable pairs from 2 overlapping tasks" in page.text
    assert re.search(r"<td>ann</td>\s*<td>0</td><td>2</td>", page.text)
    assert "4 / 6" in page.text  # submissions / slots


# ----------------------------------------------------------------------------------------------------------------
# A real server, real threads


def test_concurrent_labelers_lose_and_duplicate_nothing(tmp_path):
    """8 labelers, 50 tasks each, at the same time, against uvicorn on 127.0.0.1: 400 submissions, exactly."""
    labelers, per_labeler, overlap = 8, 50, 2
    store = Store(str(tmp_path / "labels.sqlite"))
    rows = []
    for i in range(labelers * per_labeler):  # twice the slots needed, so nobody runs dry
        rows.append({"prompt": f"prompt {i}", "responses": [f"r{i}.{j}" for j in range(4)]} if i % 2
                    else {"prompt": f"prompt {i}"})
    import_prompts(store, write_jsonl(tmp_path / "p.jsonl", rows), overlap=overlap)
    names = [f"labeler{n}" for n in range(labelers)]
    for name in names:
        store.add_user(name, PASSWORD)
    done: dict[str, list[int]] = {n: [] for n in names}
    errors: list[str] = []
    deadline = time.monotonic() + 150

    def work(name: str, url: str) -> None:
        rng = random.Random(name)
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                assert login(c, name).status_code == 303
                while len(done[name]) < per_labeler and time.monotonic() < deadline:
                    r = c.get("/next")
                    assert r.status_code == 303, r.text
                    task_id = int(re.match(r"/task/(\d+)", r.headers["location"]).group(1))
                    page = c.get(r.headers["location"])
                    if 'data-k="' in page.text:
                        k = 4
                        form = ranking_form(page.text, [rng.randint(1, k) for _ in range(k)],
                                            [rng.randint(1, 7) for _ in range(k)],
                                            [rng.sample(["hallucination", "harmful_advice"], rng.randint(0, 2))
                                             for _ in range(k)])
                    else:
                        form = {"csrf_token": csrf_of(page.text), "response": f"{name} on {task_id}"}
                    r = c.post(f"/task/{task_id}", data=form)
                    assert r.status_code == 303, r.text
                    done[name].append(task_id)
        except Exception as e:  # noqa: BLE001 - reported below with the labeler's name
            errors.append(f"{name}: {e!r}")

    with live_server(create_app(store)) as url:
        threads = [threading.Thread(target=work, args=(n, url)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic() + 5))
        assert not any(t.is_alive() for t in threads), "labelers still running at the deadline"
    assert errors == []
    assert all(len(done[n]) == per_labeler for n in names), {n: len(v) for n, v in done.items()}
    assert all(len(set(done[n])) == per_labeler for n in names)  # nobody got a task twice

    subs = submissions(store)
    assert len(subs) == labelers * per_labeler
    assert len({(s["task_id"], s["labeler"]) for s in subs}) == len(subs)
    for name in names:
        assert sorted(s["task_id"] for s in subs if s["labeler"] == name) == sorted(done[name])
    per_task: dict[int, int] = {}
    for s in subs:
        per_task[s["task_id"]] = per_task.get(s["task_id"], 0) + 1
    assert max(per_task.values()) <= overlap
    summary = export(store, str(tmp_path / "out"))
    assert summary.demonstrations + summary.rankings + summary.all_tied == len(subs)
    assert len(data.load_demonstrations(summary.demonstrations_path)) == summary.demonstrations
    assert len(data.load_comparisons(summary.rankings_path)) == summary.rankings


def test_simultaneous_duplicate_posts_store_one_submission(setup):
    c0 = client_for(setup, "ann")
    page = c0.get("/next")
    form = ranking_form(page.text, [2, 1, 3], [3, 6, 1])
    cookies = dict(c0.cookies)
    codes: list[int] = []
    with live_server(create_app(setup)) as url:
        def post():
            with httpx.Client(base_url=url, cookies=cookies, timeout=30) as c:
                codes.append(c.post("/task/1", data=form).status_code)
        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert codes == [303] * 6
    assert [(s["task_id"], s["labeler"], s["ranks"]) for s in submissions(setup)] == [(1, "ann", [2, 1, 3])]


@pytest.mark.parametrize("trusted", [None, "127.0.0.1"])
def test_the_per_address_login_limit_trusts_forwarding_headers_only_from_configured_proxies(setup, trusted):
    """25 failed logins, each for another account and with another spoofed X-Forwarded-For: served as `label serve`
    serves by default, they all come from the connection's own address, and its limit (20) refuses the 21st; with
    the proxy's address trusted (--forwarded-allow-ips 127.0.0.1, the test client's), each header is a client of
    its own and none is refused."""
    from instructgpt.labeling.cli import proxy_settings
    from instructgpt.labeling.security import LoginThrottle

    app = create_app(setup, login_throttle=LoginThrottle({"user": 5, "addr": 20}, window=900))
    statuses = []
    with live_server(app, **proxy_settings(trusted)) as url, httpx.Client(base_url=url) as c:
        for i in range(25):
            token = csrf_of(c.get("/login").text)
            r = c.post("/login", data={"username": f"nobody{i}", "password": "wrong", "csrf_token": token},
                       headers={"X-Forwarded-For": f"203.0.113.{i}"}, follow_redirects=False)
            statuses.append(r.status_code)
    if trusted is None:
        assert statuses == [401] * 20 + [429] * 5
    else:
        assert statuses == [401] * 25
