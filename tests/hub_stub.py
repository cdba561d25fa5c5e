"""Test helpers (not tests): a local stand-in for the Hugging Face hub, for HF_ENDPOINT.

It answers what `huggingface_hub.snapshot_download` asks of a model repository (the revision's
commit, the recursive file listing, HEAD and ranged GET of each file), logs every request, and
can fail on purpose: drop a file's connection after some bytes, or answer an error once.
"""

import hashlib
import http.server
import json
import os
import re
import threading
import urllib.parse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>revision|tree)/(?P<rev>[^/]+)")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


def read_tree(directory: str, prefix: str = "") -> dict[str, bytes]:
  """Every file under `directory` as {prefix + relative path: bytes}."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        files[prefix + os.path.relpath(full, directory).replace(os.sep, "/")] = f.read()
  return files


class StubHub:
  """Serves `repos` ({"owner/name": {path: bytes}}) at `self.url` until `close()`."""

  def __init__(self, repos: dict[str, dict[str, bytes]]):
    self.repos = repos
    self.requests = []  # (method, path, Range header or None)
    self.drop_after = {}  # file -> bytes sent before the first GET's connection is cut
    self.fail_once = {}  # file -> HTTP status its first GET answers
    self.lock = threading.Lock()
    stub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def do_GET(self):
        stub._answer(self)

      def do_HEAD(self):
        stub._answer(self)

      def log_message(self, *args):  # quiet
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()

  def gets(self, file: str) -> list[str | None]:
    """The Range header of every GET of `file` (None: the whole file)."""
    return [rng for method, path, rng in self.requests
            if method == "GET" and path.endswith("/" + file) and "/resolve/" in path]

  def fetched(self) -> set[str]:
    """Every file some request downloaded or asked about."""
    return {RESOLVE.fullmatch(path)["file"] for _, path, _ in self.requests
            if RESOLVE.fullmatch(path)}

  def _answer(self, handler):
    path = urllib.parse.urlparse(handler.path).path
    with self.lock:
      self.requests.append((handler.command, path, handler.headers.get("Range")))
    if match := API.fullmatch(path):
      files = self.repos.get(match["repo"])
      if files is None:
        return _send(handler, 404, b'{"error": "Repository not found"}',
                     {"X-Error-Code": "RepoNotFound"})
      if match["what"] == "revision":
        body = {"id": match["repo"], "sha": COMMIT,
                "siblings": [{"rfilename": name} for name in sorted(files)]}
      else:
        body = [{"type": "file", "path": name, "size": len(data), "oid": _sha(data)[:40]}
                for name, data in sorted(files.items())]
      return _send(handler, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})
    match = RESOLVE.fullmatch(path)
    files = self.repos.get(match["repo"]) if match else None
    if files is None:
      return _send(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"})
    name = urllib.parse.unquote(match["file"])
    if name not in files:
      return _send(handler, 404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
    self._send_file(handler, name, files[name])

  def _send_file(self, handler, name: str, data: bytes):
    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_sha(data)}"', "Accept-Ranges": "bytes"}
    if handler.command == "HEAD":
      return _send(handler, 200, data, headers, head=True)
    with self.lock:
      status = self.fail_once.pop(name, None)
      cut = self.drop_after.pop(name, None) if handler.headers.get("Range") is None else None
    if status is not None:
      return _send(handler, status, b'{"error": "try again"}', {"X-Repo-Commit": COMMIT})
    start = 0
    if rng := handler.headers.get("Range"):
      start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
      headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
    body = data[start:]
    if cut is None:
      return _send(handler, 206 if start else 200, body, headers)
    # The whole length promised, part of it sent, then the connection closed: a dropped download.
    handler.send_response(200)
    for key, value in headers.items():
      handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[:cut])
    handler.wfile.flush()
    handler.close_connection = True


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _send(handler, status: int, body: bytes, headers: dict, head: bool = False):
  handler.send_response(status)
  for key, value in headers.items():
    handler.send_header(key, value)
  handler.send_header("Content-Length", str(len(body)))
  handler.end_headers()
  if handler.command != "HEAD" and not head:
    handler.wfile.write(body)
