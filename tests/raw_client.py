"""A client of the Chronos protocol in a few dozen lines, importing nothing of Chronos (docs/protocol.md).

Usage: python raw_client.py SOCKET OP [JSON-ARGS]; prints the answer's JSON and exits with its
``exit`` code (0 on success), as the ``chronos`` CLI would.
"""

import json
import socket
import sys


def call(path, op, args=None, request_id=1):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        message = {"v": 1, "id": request_id, "op": op, "args": args or {}}
        sock.sendall(json.dumps(message).encode() + b"\n")
        reader = sock.makefile("rb")
        while True:
            line = reader.readline()
            if not line:
                raise SystemExit("the service closed the connection")
            answer = json.loads(line)
            if "wait" not in answer:  # progress lines of a queued request come first
                return answer


if __name__ == "__main__":
    answer = call(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
    print(json.dumps(answer))
    sys.exit(0 if answer["ok"] else answer["error"]["exit"])
