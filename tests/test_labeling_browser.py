"""The labeling app in a real browser: headless Debian chromium driven by Python Playwright.

A labeler logs in, rates four outputs and ranks them with the keyboard and by dragging (with a tie), submits with
Enter, gets the next task, and so on to the end of the queue. The ranking page is saved as a screenshot in
runs/screenshots/ (or $INSTRUCTGPT_SCREENSHOT_DIR). Needs `pip install playwright` (no `playwright install`: the
system chromium is used) and `apt-get install chromium`; skipped, with the reason, when either is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import live_server
from instructgpt.labeling.app import create_app
from instructgpt.labeling.formats import import_prompts
from instructgpt.labeling.store import Store, display_order

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = os.environ.get("INSTRUCTGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT_DIR = Path(os.environ.get("INSTRUCTGPT_SCREENSHOT_DIR",
                                     Path(__file__).resolve().parents[1] / "runs" / "screenshots"))
PASSWORD = "correct horse battery"
XSS = '<script>alert("xss")</script><img src=x onerror=alert(1)>'

pytestmark = [
    pytest.mark.skipif(sync_playwright is None,
                       reason="Python playwright is not installed (pip install playwright; the browser tests use "
                              "the system chromium, no `playwright install`)"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"chromium not found at {CHROMIUM} (apt-get install chromium)"),
]


def test_label_rate_rank_submit_next_in_chromium(tmp_path):
    store = Store(str(tmp_path / "labels.sqlite"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": f"Explain why the sky is blue to a six-year-old. {XSS}", "responses": [
            "Sunlight is made of all the colors. Air bounces the blue part around the most, so blue reaches your "
            "eyes from every direction.",
            "Rayleigh scattering: intensity goes as the inverse fourth power of the wavelength.",
            "The sky is blue because it reflects the ocean.",
            f"{XSS} The blue light gets scattered all over the sky."]},
        {"prompt": "Name a fruit.", "responses": ["An apple.", "Carrot.", "A banana."]},
        {"prompt": "Write a haiku about autumn."},
    ]) + "\n", encoding="utf-8")
    import_prompts(store, str(prompts))
    ann = store.add_user("ann", PASSWORD)

    dialogs, problems, outside = [], [], []
    with live_server(create_app(store)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15_000)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            # Console errors are script errors and CSP violations ("Refused to ..."); the 401 of the wrong password
            # below is expected.
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" and "status of 401" not in m.text
                    else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:")) else None)

            # Log in: a wrong password first, then the right one.
            page.goto(url + "/")
            page.fill("input[name=username]", "ann")
            page.fill("input[name=password]", "wrong password")
            page.click("button[type=submit]")
            expect(page.locator(".error")).to_contain_text("Wrong username or password")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(url + "/task/1")
            expect(page.locator(".progress-text")).to_have_text("Task 1 of 3")
            # The payload is on the page as text, not markup.
            expect(page.locator(".prompt .text")).to_contain_text('<script>alert("xss")</script>')

            # Rate A..D from the keyboard: 1-7 rates the current output, J moves to the next.
            for key in ["6", "j", "3", "j", "5", "j", "2"]:
                page.keyboard.press(key)
            page.keyboard.press("s")  # order by ratings: A(6) C(5) B(3) D(2)
            page.keyboard.press("k")
            page.keyboard.press("k")  # current: B
            page.keyboard.press("Shift+ArrowUp")  # A B C D
            page.keyboard.press("t")  # B tied with A
            page.check("#output-B input[value=hallucination]")  # a click also makes B the current output
            # Drag D to the top of the ranking.
            page.locator('.rank-item[data-label="D"]').drag_to(page.locator('.rank-item[data-label="A"]'),
                                                                target_position={"x": 40, "y": 4})
            items = page.locator("#rank-list .rank-item")
            expect(items).to_have_count(4)
            assert [items.nth(i).get_attribute("data-label") for i in range(4)] == ["D", "A", "B", "C"]
            assert [t.strip() for t in page.locator("#rank-list .rank-no").all_inner_texts()] == ["1", "2", "2", "3"]
            expect(page.locator('.rank-item[data-label="A"] .chip-rating')).to_have_text("6/7")
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOT_DIR / "labeling_ranking.png"
            page.screenshot(path=str(shot), full_page=True)

            page.locator("body").click(position={"x": 5, "y": 200})  # focus off the checkbox, then submit with Enter
            page.keyboard.press("Enter")
            page.wait_for_url(url + "/task/2")
            expect(page.locator(".progress-text")).to_have_text("Task 2 of 3")

            # The next task with the mouse: click ratings, order by them, click Submit.
            for label, rating in (("A", "2"), ("B", "7"), ("C", "7")):
                page.click(f'#output-{label} .pill:has(input[value="{rating}"])')
            page.click("#order-by-rating")
            page.click("#submit")
            page.wait_for_url(url + "/task/3")

            # A demonstration: the draft survives a reload; Ctrl+Enter submits.
            page.fill("textarea", "Crisp leaves letting go,\nthe maple counts its colours,\nwind keeps the tally.")
            page.wait_for_timeout(500)
            page.reload()
            expect(page.locator("textarea")).to_have_value(
                "Crisp leaves letting go,\nthe maple counts its colours,\nwind keeps the tally.")
            page.keyboard.press("Control+Enter")
            expect(page.locator("h1")).to_have_text("All caught up")
            expect(page.locator(".progress-text")).to_have_text("3 of 3 done")
        finally:
            browser.close()

    assert dialogs == [], "a script ran from untrusted text"
    assert problems == [], problems  # no script errors, no CSP violations
    assert outside == [], "the page requested something from outside the app"
    assert shot.stat().st_size > 10_000

    # What the browser submitted, mapped back from the labeler's letters to the task's responses.
    subs = list(store.iter_submissions())
    assert [s["task_id"] for s in subs] == [1, 2, 3]
    letter = {chr(ord("A") + n): i for n, i in enumerate(display_order(1, ann.id, 4))}
    by_letter = lambda field: {L: subs[0][field][i] for L, i in letter.items()}  # noqa: E731
    assert by_letter("ranks") == {"D": 1, "A": 2, "B": 2, "C": 3}
    assert by_letter("ratings") == {"A": 6, "B": 3, "C": 5, "D": 2}
    assert by_letter("flags") == {"A": [], "B": ["hallucination"], "C": [], "D": []}
    letter2 = {chr(ord("A") + n): i for n, i in enumerate(display_order(2, ann.id, 3))}
    assert {L: subs[1]["ranks"][i] for L, i in letter2.items()} == {"B": 1, "C": 1, "A": 2}
    assert subs[2]["response"].startswith("Crisp leaves letting go,\nthe maple")


def test_pages_fit_a_390_px_phone_without_scrolling_sideways(tmp_path):
    """At a phone's 390 px, the ranking task, the demonstration task and the admin page are no wider than the
    screen: the top bar wraps, and a wide table scrolls inside itself."""
    store = Store(str(tmp_path / "labels.sqlite"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Explain why the sky is blue to a six-year-old.", "responses": [
            "Sunlight is made of all the colors; air scatters the blue part most.", "Rayleigh scattering.",
            "It reflects the ocean.", "Blue light scatters."]},
        {"prompt": "Write a haiku about autumn."},
    ]) + "\n", encoding="utf-8")
    import_prompts(store, str(prompts))
    store.add_user("root", PASSWORD, is_admin=True)
    widths = {}
    with live_server(create_app(store)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 800})
            page.set_default_timeout(15_000)
            page.goto(url + "/")
            page.fill("input[name=username]", "root")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.locator(".account")).to_be_visible()
            for path in ("/task/1", "/task/2", "/admin"):
                page.goto(url + path)
                expect(page.locator(".topbar")).to_be_visible()
                widths[path] = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        finally:
            browser.close()
    assert widths == {p: [390, 390] for p in ("/task/1", "/task/2", "/admin")}
