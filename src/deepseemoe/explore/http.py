"""The explorer's HTTP protocol: uvicorn's h11 protocol with one more guard.

h11 caps a request head only while it is incomplete (16 KiB by default), so a 100 kB header, or
10,000 headers, passed when the request arrived in one write and got 400 when it came in pieces.
Here the head is measured as it arrives, whatever the timing: more than MAX_HEAD_BYTES before the
blank line, or more than MAX_HEADERS header lines, is answered 431 (Request Header Fields Too Large)
and the connection closed.
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
H11_BUFFER = 4 * MAX_HEAD_BYTES  # h11's own cap, above ours: the 431 comes first

_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
              b"connection: close\r\ncontent-length: 34\r\n\r\nrequest header fields too large\r\n\r\n")


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head = b""  # the bytes of the current request's head received so far
        self._in_head = True

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            head = self._head if end < 0 else self._head[:end]
            if len(head) > MAX_HEAD_BYTES or head.count(b"\r\n") > MAX_HEADERS:
                self.transport.write(_TOO_LARGE)
                self.transport.close()
                return
            if end >= 0:
                self._in_head, self._head = False, b""
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._in_head, self._head = True, b""  # keep-alive: the next request's head starts
        super().on_response_complete()
