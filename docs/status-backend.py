"""A demo backend for docs/status-screenshot.sh: `python3 status-backend.py PORT MEAN_SECS FAIL_SHARE`.

Answers every GET after an exponentially distributed delay of mean MEAN_SECS; a share
FAIL_SHARE of requests to paths other than `/` (the health check's) get a 500.
"""
import random
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, delay, fail = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(random.expovariate(1 / delay) if delay else 0)
        failed = self.path != "/" and random.random() < fail
        body = f"backend {port}\n".encode()
        self.send_response(500 if failed else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
