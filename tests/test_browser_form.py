"""The New-experiment form in a real browser, typed into as a first-time user does (issue 10, "The form").

A value the browser field accepts is kept as typed and refused next to its field with Launch disabled; a refused
upload shows only its own reason; a dataset that is not on disk is flagged when picked; the run name follows the
config until it is typed. Each check waits for what the user would see; none depends on timing.
"""

from __future__ import annotations

import pytest

from tests.test_browser import SHOTS, browser_page, serve, settle, type_into

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def form_url(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("form")) as (url, env):
        yield url, env


def open_form(page, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/new_experiment")
    expect(page.get_by_text("Start from a preset", exact=True)).to_be_visible()
    settle(page)


def alerts(page) -> list[str]:
    return [t.replace("error\n\n", "").replace("warning\n\n", "").strip()
            for t in page.locator("[data-testid='stAlertContentError'], [data-testid='stAlertContentWarning']").all_inner_texts()]


def test_typed_values_are_kept_and_refused_next_to_their_field(form_url):
    from playwright.sync_api import expect

    url, env = form_url
    with browser_page() as page:
        open_form(page, url)
        launch = page.get_by_role("button", name="Launch")
        expect(launch).to_be_enabled()
        type_into(page, "Learning rate", "-0.1", nth=1)  # the student's
        expect(page.get_by_label("Learning rate", exact=True).nth(1)).to_have_value("-0.1")
        expect(page.get_by_text("student.optimizer.lr: Input should be greater than 0").first).to_be_visible()
        expect(launch).to_be_disabled()
        type_into(page, "Epochs", "2.5", nth=1)  # an integer field used to truncate this to 2
        expect(page.get_by_label("Epochs", exact=True).nth(1)).to_have_value("2.5")
        expect(page.get_by_text("student.epochs: Input should be a valid integer, got a number with a fractional part").first).to_be_visible()
        page.screenshot(path=str(SHOTS / "form_refused_values.png"))
        type_into(page, "Learning rate", "0.1", nth=1)
        type_into(page, "Epochs", "8", nth=1)
        expect(launch).to_be_enabled()
        assert alerts(page) == []
    from storage import Store

    store = Store(env["DISTILLERY_DB_URL"])
    assert store.list_runs(include_hidden=True) == []  # nothing was launched with a value the user did not type
    store.dispose()


def test_a_refused_upload_shows_only_its_own_reason(form_url, tmp_path):
    from playwright.sync_api import expect

    url, _ = form_url
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with browser_page() as page:
        open_form(page, url)
        page.get_by_test_id("stSelectbox").filter(has_text="Weights").click()
        page.get_by_role("option", name="Upload a checkpoint").click()
        settle(page)
        expect(page.get_by_text("teacher.source: upload a checkpoint file (.safetensors or .pt)").first).to_be_visible()
        page.locator("input[type=file][accept*=safetensors]").set_input_files(str(junk))
        expect(page.get_by_text("teacher.source: junk.pt is not a plain torch state dict").first).to_be_visible()
        settle(page)
        shown = alerts(page)
        assert not any("upload a checkpoint file" in a or "is not a teacher source" in a for a in shown), shown
        assert [a for a in shown if "teacher.source" in a and "Fix these" not in a] == [
            next(a for a in shown if a.startswith("teacher.source: junk.pt"))]
        page.screenshot(path=str(SHOTS / "form_refused_upload.png"))


def test_a_missing_dataset_is_flagged_and_the_name_follows_the_config(form_url):
    from playwright.sync_api import expect

    url, env = form_url
    with browser_page() as page:
        open_form(page, url)
        name = page.get_by_label("Name", exact=True)
        expect(name).to_have_value("mnist5k cnn_small -> cnn_tiny KD")
        page.get_by_test_id("stSelectbox").filter(has_text="Dataset").first.click()
        page.get_by_role("option", name="cifar10 —").click()
        settle(page)
        expect(page.get_by_text(f"cifar10 is not in {env['DISTILLERY_HOME']}/datasets yet").first).to_be_visible()
        expect(page.get_by_text("cifar-10-batches-py/data_batch_1").first).to_be_visible()
        expect(name).to_have_value("cifar10 cnn_small -> cnn_tiny KD")
        type_into(page, "Name", "my cifar try")
        page.get_by_test_id("stSelectbox").filter(has_text="Dataset").first.click()
        page.get_by_role("option", name="digits —").click()
        settle(page)
        expect(name).to_have_value("my cifar try")
