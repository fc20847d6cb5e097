"""Drive the operator's web page in a real headless Chromium, as an operator.

Run by tests/ui.rs against a host it started and filled with receipts; it
exits non-zero (with Playwright's message) at the first thing that is not as
an operator must see it. Environment: UI_URL, ADMIN_KEY, DEAL (delivered
after a 500), DEAD_DEALS (two dead-lettered deals, comma-separated),
HOSTILE_DEAL (a reference that is HTML), SCREENSHOTS (a folder), CHROMIUM.
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

url, key, deal = os.environ["UI_URL"], os.environ["ADMIN_KEY"], os.environ["DEAL"]
first_dead, second_dead = os.environ["DEAD_DEALS"].split(",")
hostile = os.environ["HOSTILE_DEAL"]
shots = os.environ["SCREENSHOTS"]
expect.set_options(timeout=15_000)


def operate(page):
    """Everything an operator does, in order."""
    # Signing in: a wrong key is refused; the admin key is kept for the session.
    page.goto(f"{url}/ui")
    page.fill("#admin-key", "not-the-key")
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_contain_text("not the admin key")
    expect(page.locator("#app")).to_be_hidden()
    page.fill("#admin-key", key)
    page.click("#login-form button")
    expect(page.locator("#app")).to_be_visible()
    page.reload()
    expect(page.locator("#app")).to_be_visible()

    # The landing view lists the latest receipts with their deal references.
    references = page.locator("#receipts tr.receipt .reference")
    expect(references).to_have_count(4)
    expect(page.locator("#receipts")).to_contain_text(deal)
    # A reference that is HTML is shown as text, never made into elements
    # (the page's CSP would stop its script; this checks the page itself).
    expect(page.locator("#receipts")).to_contain_text(hostile)
    assert page.locator("#receipts img").count() == 0, "a webhook's HTML became part of the page"

    # Finding a deal shows its actions and their attempts: 500, then 200.
    page.fill("#search-reference", deal)
    page.click("#search button")
    detail = page.locator("#receipt-detail")
    expect(detail.locator("h2")).to_have_text(f"Deal {deal} — Qualified")
    attempts = detail.locator('section.action-detail[data-destination="meta-capi"] tr.attempt')
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0).locator(".outcome")).to_have_text("retryable")
    expect(attempts.nth(0).locator(".status")).to_have_text("500")
    expect(attempts.nth(1).locator(".outcome")).to_have_text("delivered")
    expect(attempts.nth(1).locator(".status")).to_have_text("200")
    expect(page.locator("#stats")).to_contain_text("deliveries/s")
    page.screenshot(path=f"{shots}/ui-deal.png", full_page=True)

    # Dead letters: replay one; then the rest, after a confirmation.
    page.click('nav button[data-view="dead"]')
    letters = page.locator("tr.dead-letter")
    expect(letters).to_have_count(2)
    expect(page.locator("tr.dead-letter", has_text=first_dead)).to_contain_text("code 100")
    # A downstream's error that is HTML is shown as text too.
    expect(page.locator("tr.dead-letter", has_text=second_dead)).to_contain_text("<img src=x id=injected>")
    assert page.locator("#injected").count() == 0, "a downstream's HTML became part of the page"
    page.screenshot(path=f"{shots}/ui-dead-letters.png", full_page=True)
    page.locator("tr.dead-letter", has_text=first_dead).locator("button.replay").click()
    expect(page.locator("#message")).to_have_text("1 dead letter(s) queued again.")
    expect(letters).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#replay-shown")
    expect(letters).to_have_count(1)  # declined: nothing replayed
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#replay-shown")
    expect(page.locator("#message")).to_have_text("1 dead letter(s) queued again.")
    expect(letters).to_have_count(0)

    # Destinations: pause one.
    page.click('nav button[data-view="destinations"]')
    brevo = page.locator('tr.destination[data-name="brevo"]')
    expect(brevo.locator(".state")).to_have_text("running")
    brevo.locator("button.pause").click()
    expect(brevo.locator(".state")).to_contain_text("paused by an operator")
    expect(brevo.locator("button.resume")).to_be_visible()
    page.screenshot(path=f"{shots}/ui-destinations.png", full_page=True)

    # Plugins: version, digest, grants.
    page.click('nav button[data-view="plugins"]')
    expect(page.locator("#plugins tr.plugin")).to_have_count(3)
    expect(page.locator("#plugins")).to_contain_text("BREVO_* (own name)")
    page.screenshot(path=f"{shots}/ui-plugins.png", full_page=True)

    # Signing out forgets the key.
    page.click("#sign-out")
    page.reload()
    expect(page.locator("#login")).to_be_visible()


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    script_errors = []
    page.on("pageerror", lambda e: script_errors.append(str(e)))
    try:
        operate(page)
    except Exception:
        page.screenshot(path=f"{shots}/ui-failure.png", full_page=True)
        print(f"the page when it failed: {shots}/ui-failure.png; script errors: {script_errors}", file=sys.stderr)
        raise
    browser.close()
    if script_errors:
        sys.exit(f"script errors on the page: {script_errors}")
print("the web page did all an operator asked")
