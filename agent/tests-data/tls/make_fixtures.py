#!/usr/bin/env python3
"""Regenerates the TLS handshake fixtures: a real in-memory handshake
(Python ssl on the system OpenSSL, ssl.MemoryBIO, no network) per case, each
direction's bytes written to NAME.client.bin (client -> server) and
NAME.server.bin (server -> client), including one small application-data
exchange after the handshake.  Run from this directory:
    python3 make_fixtures.py
"""
import os, ssl, subprocess, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

def make_cert(tmp):
    key, cert = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=localhost", "-days", "2", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key

def handshake(cert, key, version, sni, server_groups=None, seclevel0=False):
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    for ctx in (sctx, cctx):
        ctx.minimum_version = version
        ctx.maximum_version = version
        if seclevel0:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if server_groups:
        sctx.set_ecdh_curve(server_groups)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=sni)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    to_server, to_client = bytearray(), bytearray()
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        data = c_out.read(); to_server += data; s_in.write(data)
        data = s_out.read(); to_client += data; c_in.write(data)
        if done["c"] and done["s"] and not data:
            break
    assert done["c"] and done["s"], "handshake did not finish"
    client.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = c_out.read(); to_server += data; s_in.write(data)
    server.read(1024)
    server.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    data = s_out.read(); to_client += data; c_in.write(data)
    client.read(1024)
    return bytes(to_server), bytes(to_client), client.version()

def main():
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(tmp)
        cases = [
            ("tls13", ssl.TLSVersion.TLSv1_3, "example.test", None, False),
            ("tls12", ssl.TLSVersion.TLSv1_2, "api.example.test", None, False),
            ("tls11", ssl.TLSVersion.TLSv1_1, "old.example.test", None, True),
            # The server only accepts P-384: a HelloRetryRequest first.
            ("tls13_hrr", ssl.TLSVersion.TLSv1_3, "retry.example.test", "secp384r1", False),
        ]
        for name, version, sni, groups, sec0 in cases:
            to_server, to_client, negotiated = handshake(cert, key, version, sni, groups, sec0)
            with open(os.path.join(HERE, name + ".client.bin"), "wb") as f:
                f.write(to_server)
            with open(os.path.join(HERE, name + ".server.bin"), "wb") as f:
                f.write(to_client)
            print(name, negotiated, len(to_server), len(to_client))

main()
