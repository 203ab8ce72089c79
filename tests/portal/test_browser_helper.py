"""The browser helper itself, against a local `http.server`: a real download lands byte for byte, and a screenshot
is a PNG as wide as the window and as tall as the page."""
import functools
import os
import struct
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.portal.browser import WINDOW_HEIGHT, WINDOW_WIDTH, browser, screenshot, wait_for_file

PAGE_HEIGHT = 2500   # taller than the window, so a screenshot of the window alone would be too short
INDEX = f"""<!doctype html>
<html><head><title>browser helper</title></head>
<body style="margin: 0">
  <a id="dl" href="data.bin" download>get</a>
  <div style="height: {PAGE_HEIGHT}px; background: linear-gradient(#fff, #369)"></div>
</body></html>
"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def site(tmp_path):
    """An http.server on 127.0.0.1 (free port, own thread) serving index.html and 100 KB of random data.bin."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text(INDEX)
    data = os.urandom(100 * 1024)
    (root / "data.bin").write_bytes(data)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/index.html", data
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_download_and_full_page_screenshot(site, tmp_path):
    url, data = site
    downloads = tmp_path / "downloads"
    with browser(downloads) as driver:
        driver.get(url)
        assert driver.title == "browser helper"
        driver.find_element("id", "dl").click()
        assert wait_for_file(downloads, "data.bin").read_bytes() == data

        window = driver.get_window_size()
        shot = screenshot(driver, tmp_path / "page.png")
        width, height = png_size(shot)
        assert width == WINDOW_WIDTH
        assert height >= PAGE_HEIGHT > WINDOW_HEIGHT   # the whole page, not just the window
        assert driver.get_window_size() == window      # the window got its size back


def test_wait_for_file_names_what_the_folder_holds(tmp_path):
    (tmp_path / "data.bin.crdownload").write_bytes(b"partial")
    with pytest.raises(TimeoutError, match=r"data\.bin.*holds: data\.bin\.crdownload"):
        wait_for_file(tmp_path, "data.bin", timeout=0.3)
