"""The quick demo's report in a real browser (headless Chromium, Debian's `chromium`; `make chromium`
installs it): every image and link resolves, nothing overflows at a desktop and a phone width, and
what is drawn is not blank."""

from __future__ import annotations

import io
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image, ImageStat

from _browser import CHROMIUM, Browser

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found: `make chromium` "
                                "installs Debian's chromium (the report is then checked in a real browser)")

WIDTHS = (1280, 390)  # a laptop, a phone
HEIGHT = 900

# Elements wider than the page at this width (their right edge past the viewport), for the failure message.
OVERFLOW = """(() => {
  const width = document.documentElement.clientWidth;
  const wide = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    let clipped = false;
    for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === 'auto' || o === 'scroll' || o === 'hidden') { clipped = true; break; }
    }
    if (!clipped && r.width > 0 && r.right > width + 0.5) wide.push(el.tagName + ' ' + Math.round(r.right));
  }
  return {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth, width,
          wide: wide.slice(0, 8)};
})()"""
IMAGES = """Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,
  width: i.naturalWidth, shown: i.getBoundingClientRect().width,
  page: document.documentElement.clientWidth}))"""


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append((tag, value))


def local_targets(index: Path) -> list[tuple[str, str, Path]]:
    parser = Links()
    parser.feed(index.read_text(encoding="utf-8"))
    out = []
    for tag, url in parser.urls:
        parts = urlsplit(url)
        assert parts.scheme in ("", "file"), f"<{tag}> {url}: the report must not reach the network"
        if parts.path:  # "#anchor" links stay on the page
            out.append((tag, url, (index.parent / unquote(parts.path)).resolve()))
    return out


@pytest.fixture(scope="module")
def report(quick_demo):
    code, out = quick_demo
    assert code == 0
    return out / "report" / "index.html"


@pytest.fixture(scope="module")
def pages(report, tmp_path_factory):
    """At each width: the overflow measurement, the images as loaded, and a full-page screenshot."""
    shots = tmp_path_factory.mktemp("screenshots")
    found = {}
    with Browser() as browser:
        for width in WIDTHS:
            page = browser.open(report.as_uri(), width, HEIGHT)
            png = page.screenshot(full_page=True)
            (shots / f"report-{width}.png").write_bytes(png)
            found[width] = {"overflow": page.evaluate(OVERFLOW), "images": page.evaluate(IMAGES),
                            "title": page.evaluate("document.title"), "png": png}
    return found


def test_every_image_and_link_resolves(report, pages):
    targets = local_targets(report)
    assert len(targets) >= 10  # figures, their SVGs and the table files
    missing = [url for _, url, path in targets if not path.is_file()]
    assert not missing, f"links to missing files: {missing}"
    assert {tag for tag, _, _ in targets} >= {"a", "img"}
    for width, found in pages.items():
        images = found["images"]
        assert [i["src"] for i in images] == [url for tag, url, _ in targets if tag == "img"]
        broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
        assert not broken, f"{width} px: images the browser could not load: {broken}"
        assert "study report" in found["title"]


@pytest.mark.parametrize("width", WIDTHS)
def test_nothing_overflows(pages, width):
    o = pages[width]["overflow"]
    assert o["innerWidth"] == width
    assert o["scrollWidth"] <= o["width"] and not o["wide"], \
        f"{width} px: the page is {o['scrollWidth']} px wide; too wide: {o['wide']}"
    for image in pages[width]["images"]:  # a figure is scaled to the page, never cut
        assert image["shown"] <= image["page"], image


@pytest.mark.parametrize("width", WIDTHS)
def test_the_screenshot_is_not_blank(pages, width):
    image = Image.open(io.BytesIO(pages[width]["png"])).convert("RGB")
    assert image.width == width and image.height > HEIGHT  # the whole page, longer than one screen
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the page shows almost nothing"
    assert max(ImageStat.Stat(image).stddev) > 20  # text and figures on white, not a flat page
    top = image.crop((0, 0, width, 200))  # the title and summary are drawn, not only figures further down
    assert max(ImageStat.Stat(top).stddev) > 10
