"""Run as a script: a loopback HTTP server answering the Hub API calls of an upload, then
`push_to_hub` of a model; the uploaded files are written to the folder given as argv[1].

huggingface_hub reads HF_ENDPOINT when imported, hence a separate process."""

import base64
import http.server
import json
import os
import sys
import threading

UPLOADED = {}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code == 404:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        data = b""
        if self.headers.get("Transfer-Encoding") == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return data

    def do_POST(self):
        body = self._body()
        endpoint = os.environ["HF_ENDPOINT"]
        if self.path == "/api/repos/create":
            return self._send(200, {"url": f"{endpoint}/me/{json.loads(body)['name']}"})
        if self.path.startswith("/api/validate-yaml"):
            return self._send(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:  # every file goes as a regular (inline) upload
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    UPLOADED[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._send(200, {"commitUrl": f"{endpoint}/me/pushed/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._send(404, {"error": "not found"})

    do_GET = do_HEAD = lambda self: self._send(404, {"error": "not found"})  # noqa: E731

    def log_message(self, *args):
        pass


def main(out_dir: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_OFFLINE="0",
                      HF_TOKEN="hf_loopback_test_token", HF_HUB_DISABLE_TELEMETRY="1")
    import torch

    import metaformer

    torch.manual_seed(0)
    model = metaformer.create("metaformer_pppf_s12_224", num_classes=3, act_layer="silu", pool_size=5)
    model.push_to_hub("me/pushed")
    model.save_pretrained(os.path.join(out_dir, "saved"))
    os.makedirs(os.path.join(out_dir, "uploaded"), exist_ok=True)
    for name, data in UPLOADED.items():
        with open(os.path.join(out_dir, "uploaded", name), "wb") as f:
            f.write(data)
    server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
