"""Drives the operator console in a real browser (headless Chromium through chromedriver, with
Selenium) and checks what it shows through the DOM.

    console_browser.py ADMIN_URL SCENARIO.json SCREENSHOT.png

SCENARIO: {"farms": [farm ids with work], "queued": an aggregation id that is QUEUED now,
"callers": [identities that must show as text], "token": optional admin token}.
Prints one line per check; exits non-zero on the first that fails.
"""
import json
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.support.ui import WebDriverWait

admin, scenario, screenshot = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
options = Options()
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]:
    options.add_argument(arg)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.set_page_load_timeout(30)
wait = WebDriverWait(driver, 30)


def check(what, ok):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        driver.save_screenshot(screenshot)
        driver.quit()
        sys.exit(1)


def loaded():
    wait.until(lambda d: d.execute_script("return document.body.dataset.loaded === 'true'"))


# The page redraws every two seconds: reads go through one script call (never a stale
# element), and a click is tried again on a redrawn element.
def text(element_id):
    return driver.execute_script("const e = document.getElementById(arguments[0]); return e ? e.textContent : ''", element_id)


def attrs(selector, name):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.getAttribute(arguments[1]))", selector, name)


def click(selector):
    for _ in range(10):
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise RuntimeError("cannot click " + selector)


def no_script_ran():
    return driver.execute_script("return window.pwned === undefined && document.title.indexOf('pwned') < 0")


try:
    driver.get(admin + "/")
    if scenario.get("token"):
        wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
        check("the console asks for the token", True)
        driver.find_element(By.ID, "token").send_keys(scenario["token"])
        driver.find_element(By.CSS_SELECTOR, "#login button").click()
    loaded()

    def farm_rows():
        return set(attrs("#farms tr[data-farm]", "data-farm"))

    # The farms with work are counted each housekeeping second: the page shows them as it
    # redraws, without a reload.
    try:
        wait.until(lambda d: set(scenario["farms"]) <= farm_rows())
    except Exception:
        pass
    rows = farm_rows()
    check(f"the overview lists the farms with work {sorted(scenario['farms'])}: {sorted(rows)}", set(scenario["farms"]) <= rows)
    check("the store card says what the store is", text("card-store").strip() != "")
    replicas = driver.execute_script("return document.getElementById('card-replicas').innerText")
    count = replicas.split("\n")[1] if "\n" in replicas else ""
    check(f"the replicas card counts {scenario.get('replicas', 1)}: {replicas!r}", count == str(scenario.get("replicas", 1)))

    # A farm's page: its queue, in order, with the callers as text.
    farm = scenario["farms"][-1]
    click(f'#farms tr[data-farm="{farm}"] a')
    loaded()
    wait.until(lambda d: text("farm-id") == farm)
    check(f"the farm's page names its upstream route: {text('route')!r}", text("route") == "default")
    queue = attrs("#queue tr[data-aggregation]", "data-aggregation")
    check(f"the farm's queue shows the queued aggregation {scenario['queued']}: {queue}", scenario["queued"] in queue)
    shown = text("queue")
    for caller in scenario["callers"]:
        check(f"the caller {caller!r} shows as text", caller in shown)
    check("no value a caller sent ran as script", no_script_ran())
    driver.save_screenshot(screenshot)

    # The queued aggregation's page follows it to COMPLETED without a reload.
    click(f'#queue tr[data-aggregation="{scenario["queued"]}"] a')
    loaded()
    wait.until(lambda d: text("agg-state") != "")
    first = text("agg-state")
    check(f"the aggregation is first QUEUED or RUNNING: {first}", first in ("QUEUED", "RUNNING"))
    driver.execute_script("window.sameDocument = 'yes'")
    deadline = time.time() + 90
    seen = [first]
    while time.time() < deadline:
        state = text("agg-state")
        if state != seen[-1]:
            seen.append(state)
        if state == "COMPLETED":
            break
        time.sleep(0.2)
    check(f"it moved to COMPLETED on the page by itself: {seen}", seen[-1] == "COMPLETED")
    check("without a reload", driver.execute_script("return window.sameDocument") == "yes")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rows tbody tr"))
    events = attrs("#timeline li", "data-event")
    check(f"its timeline runs queued … ended: {events}", events[0] == "queued" and events[-1] == "ended" and "running" in events)
    links = attrs("#trace-link", "href")
    if scenario.get("trace_prefix"):
        check(f"its trace is linked: {links}", bool(links) and links[0].startswith(scenario["trace_prefix"]))
    check("no value a caller sent ran as script", no_script_ran())

    driver.save_screenshot(screenshot.replace(".png", "-aggregation.png"))
    check("screenshots were saved", True)
finally:
    driver.quit()
