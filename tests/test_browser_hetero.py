"""A heterogeneous pair launched from the form in a real browser (issue 12): a ViT teacher from timm and a CNN
student, trained on `digits`, then the Analysis page's CKA between the ViT's transformer blocks and the CNN's
stages. Token stages are compared as maps (one D-vector per image after mean pooling), so the heatmap has
the ViT's block names on one axis and the CNN's stage names on the other."""

from __future__ import annotations

import re

import pytest

from tests.test_browser import SHOTS, browser_page, serve, settle, type_into, wait_until_finished

pytestmark = pytest.mark.browser
VIT = "timm:vit_tiny_patch16_224"


def choose(page, box_label_nth: int, option_text: str) -> None:
    """Pick an option of the n-th "Architecture" selectbox by typing into its search field."""
    box = page.get_by_test_id("stSelectbox").filter(has_text="Architecture").nth(box_label_nth)
    box.click()
    page.keyboard.type(option_text)
    page.get_by_role("option", name=re.compile(re.escape(option_text))).first.click()
    settle(page)


def test_a_vit_teacher_and_a_cnn_student_launched_from_the_form_show_cka_across_families(tmp_path_factory) -> None:
    from playwright.sync_api import expect

    with serve(tmp_path_factory.mktemp("hetero")) as (url, env), browser_page() as page:
        page.goto(f"{url}/new_experiment")
        expect(page.get_by_text("Start from a preset", exact=True)).to_be_visible()
        page.get_by_test_id("stSelectbox").filter(has_text="Start from a preset").click()
        page.get_by_role("option", name="digits · cnn_small → cnn_tiny").click()
        page.get_by_role("button", name="Load preset").click()
        settle(page)
        choose(page, 0, VIT)  # the teacher's architecture
        type_into(page, "Subset (max training images)", "600")  # a ViT trains slowly on 2 CPU cores
        type_into(page, "Epochs", "1", nth=0)
        type_into(page, "Epochs", "2", nth=1)
        launch = page.get_by_role("button", name="Launch")
        expect(launch).to_be_enabled()
        launch.click()

        expect(wait_until_finished(page)).to_contain_text("completed")
        run_id = int(re.search(r"run=(\d+)", page.url).group(1))

        from storage import Store

        store = Store(env["DISTILLERY_DB_URL"])
        config = store.get_run(run_id).config
        store.dispose()
        assert (config["teacher"]["arch"], config["student"]["arch"]) == (VIT, "cnn_tiny")  # what was picked is what ran

        page.goto(f"{url}/analysis?run={run_id}")
        settle(page)
        expect(page.locator("[data-testid='stException']")).to_have_count(0)
        expect(page.get_by_text("analysis failed")).to_have_count(0)  # every view, attribution maps of the ViT included
        heatmap = page.locator(".js-plotly-plot").first
        expect(heatmap).to_be_visible()
        # the ViT's transformer blocks on one axis, the CNN's stages on the other
        expect(heatmap.locator("text", has_text="blocks.11").first).to_be_attached()
        expect(heatmap.locator("text", has_text="stage").first).to_be_attached()
        page.screenshot(path=str(SHOTS / "analysis_cka_vit_to_cnn.png"))
