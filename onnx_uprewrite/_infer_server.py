"""onnx shape inference as a server process (isolate.infer_shapes): run as a script, it imports only
onnx and answers length-prefixed requests on stdin/stdout until stdin closes.

Request: 8-byte little-endian length + a serialized ModelProto.  Answer: 8-byte length + one status
byte (0: the inferred ModelProto follows; 1: an error message follows).  onnx's C++ aborting the
process on a malformed model (e.g. std::clamp's assertion in Slice inference) ends only this
process, which the client reports and restarts.
"""

import struct
import sys

import onnx


def main() -> None:
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = requests.read(8)
        if len(head) < 8:
            return
        (size,) = struct.unpack("<Q", head)
        data = requests.read(size)
        try:
            model = onnx.ModelProto()
            model.ParseFromString(data)
            body = b"\x00" + onnx.shape_inference.infer_shapes(model, strict_mode=False).SerializeToString()
        except Exception as exc:  # noqa: BLE001 - reported to the client, which decides
            body = b"\x01" + f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
        answers.write(struct.pack("<Q", len(body)) + body)
        answers.flush()


if __name__ == "__main__":
    main()
