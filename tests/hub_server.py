"""A Hub-compatible HTTP server on loopback for the tests: enough of the Hub's API for
``create_repo``, ``upload_folder`` (model-card validation, preupload and commit, every file
sent as a regular blob) and the downloads of ``from_pretrained`` (model info and ``resolve``), recording what arrives.
Point a client at it with ``HF_ENDPOINT=server.endpoint``.
"""

import base64
import hashlib
import json
import re
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

USER = "test-user"


class FakeHub:
    def __init__(self):
        self.repos = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [summary], "sha": str}
        self.requests = []  # (method, path, Authorization header)
        self.fail_commits = 0  # the next N commits are refused (400: huggingface_hub does not retry it itself)
        self.preupload_seconds = 0  # how long each preupload answer takes: a slow upload, whose files are read after it
        self.validated_metadata = []  # the model cards' YAML metadata, as the Hub validates it
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()

    def handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, payload=None, body=None, headers=None):
                data = body if body is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def read_body(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    return self.rfile.read(length)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return b""

            def route(self):
                path = unquote(urlparse(self.path).path)
                with hub.lock:
                    hub.requests.append((self.command, path, self.headers.get("Authorization")))
                return path

            def do_POST(self):
                path, body = self.route(), self.read_body()
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or USER}/{request['name']}"
                    with hub.lock:
                        if repo_id in hub.repos:
                            return self.reply(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
                        private = request.get("private") or request.get("visibility") == "private"
                        hub.repos[repo_id] = {"private": bool(private), "files": {}, "commits": [], "sha": "0" * 40}
                    return self.reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    try:
                        metadata = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                    except yaml.YAMLError as error:
                        return self.reply(400, {"errors": [{"message": str(error)}]})
                    # As the Hub: a model card's base_model must name models on the Hub, not local folders.
                    base_models = metadata.get("base_model") or []
                    for value in [base_models] if isinstance(base_models, str) else base_models:
                        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(value)):
                            return self.reply(400, {"error": f'"base_model" with value "{value}" is not valid. '
                                                             "Use a model id from https://hf.co/models."})
                    hub.validated_metadata.append(metadata)
                    return self.reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/(.+?)/(preupload|commit)/(.+)", path)
                if match is None or match.group(1) not in hub.repos:
                    return self.reply(404, {"error": f"Repository not found: {path}"})
                repo = hub.repos[match.group(1)]
                if match.group(2) == "preupload":
                    time.sleep(hub.preupload_seconds)
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [
                        {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for item in files
                    ]})
                with hub.lock:
                    if hub.fail_commits:
                        hub.fail_commits -= 1
                        return self.reply(400, {"error": "the test server refused this commit"})
                    summary = None
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            summary = item["value"]["summary"]
                        elif item["key"] == "file":
                            repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo["commits"].append(summary)
                    repo["sha"] = hashlib.sha1(repr(sorted(repo["files"].items())).encode()).hexdigest()
                return self.reply(200, {"commitUrl": f"{hub.endpoint}/{match.group(1)}/commit/{repo['sha']}",
                                        "commitOid": repo["sha"], "success": True})

            def do_GET(self):
                path = self.route()
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/.+)?", path)
                if match is not None and match.group(1) in hub.repos:
                    repo = hub.repos[match.group(1)]
                    return self.reply(200, {
                        "id": match.group(1), "modelId": match.group(1), "sha": repo["sha"], "private": repo["private"],
                        "siblings": [{"rfilename": name} for name in sorted(repo["files"])], "tags": [],
                        "lastModified": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "downloads": 0, "likes": 0,
                    })
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+", path)
                if match is not None and match.group(1) in hub.repos:
                    files = hub.repos[match.group(1)]["files"]
                    return self.reply(200, [
                        {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                        for name, content in sorted(files.items())
                    ])
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
                if match is not None and match.group(1) in hub.repos and match.group(2) in hub.repos[match.group(1)]["files"]:
                    repo = hub.repos[match.group(1)]
                    content = repo["files"][match.group(2)]
                    return self.reply(200, body=content, headers={
                        "X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                    })
                return self.reply(404, {"error": f"Entry not found: {path}"}, headers={"X-Error-Code": "EntryNotFound"})

            do_HEAD = do_GET

        return Handler
