#!/usr/bin/env python3
"""bench/tcpsink.py ADDRESS PORT OUTFILE - accept one TCP connection, read it to EOF, discard the
bytes, and write "BYTES FIRST LAST" to OUTFILE (LAST-FIRST = from the first to the last byte
received, seconds since the epoch). bench/run.sh (bandwidth) runs one in each host's network
namespace to measure what a capped link really carries, without SSH's CPU cost. "listening" is
printed on stdout once the socket listens."""
import socket
import sys
import time


def main():
    addr, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    srv.close()
    buf = bytearray(1 << 20)
    n = 0
    first = last = 0.0
    while True:
        k = conn.recv_into(buf)
        if k == 0:
            break
        last = time.time()
        if n == 0:
            first = last
        n += k
    conn.close()
    with open(out, "w") as f:
        f.write("%d %.6f %.6f\n" % (n, first, last))


if __name__ == "__main__":
    main()
