import sys
# Debian's grpcio (python3-grpcio, on the system OpenSSL) must win over a pip
# grpcio that may sit in /usr/local (BoringSSL inside, invisible to uprobes).
sys.path.insert(0, "/usr/lib/python3/dist-packages")
import json, os, time, threading
from concurrent import futures
import grpc

PAYLOAD_MARK = "PAYLOAD-MARK-5e1f"
ERROR_MARK = "ERRMSG-MARK-8c2d"

def ident(b):
    return b

def check_library():
    f = grpc.__file__
    if not f.startswith("/usr/lib/python3/dist-packages/"):
        sys.exit("grpc imported from %s, not Debian's python3-grpcio" % f)
    maps = open("/proc/self/maps").read()
    if "libssl.so.3" not in maps:
        sys.exit("libssl.so.3 is not mapped: this grpcio does not use the system OpenSSL")

def say_hello(req, ctx):
    if b"notfound" in req:
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such greeting " + ERROR_MARK)
    if b"slow" in req:
        time.sleep(0.2)
    return b"hello " + req

def say_goodbye(req, ctx):
    return b"goodbye " + req

def stream_hellos(req, ctx):
    # request: b"N MS rest"
    n, ms = req.split(b" ")[:2]
    for i in range(int(n)):
        if i:
            time.sleep(int(ms) / 1000.0)
        yield b"hello #%d %s" % (i, PAYLOAD_MARK.encode())

def serve(cert, key):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Greeter", {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello, ident, ident),
        "SayGoodbye": grpc.unary_unary_rpc_method_handler(say_goodbye, ident, ident),
        "StreamHellos": grpc.unary_stream_rpc_method_handler(stream_hellos, ident, ident),
    }),))
    if cert == "-":
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())])
        port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    check_library()
    print("listening %d" % port, flush=True)
    server.wait_for_termination()

def now():
    return time.time_ns()

SERVER_PORT = 0

def conns():
    # Local ports of this process's established TCP connections to the
    # server: the test checks that every call used one and the same.
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    # gRPC's sockets may be IPv6 ones with v4-mapped addresses.
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[2].split(":")[-1], 16) == SERVER_PORT and f[9] in inodes:
                ports.append(int(f[1].split(":")[-1], 16))
    return sorted(ports)

def out(**kw):
    if kw.get("step", "").split(":")[0] != "sleep":
        kw["conns"] = conns()
    print(json.dumps(kw), flush=True)

def client(port, cert, steps):
    global SERVER_PORT
    SERVER_PORT = port
    target = "127.0.0.1:%d" % port
    if cert == "-":
        ch = grpc.insecure_channel(target)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=open(cert, "rb").read())
        ch = grpc.secure_channel(target, creds)
    hello = ch.unary_unary("/demo.Greeter/SayHello", ident, ident)
    goodbye = ch.unary_unary("/demo.Greeter/SayGoodbye", ident, ident)
    streamer = ch.unary_stream("/demo.Greeter/StreamHellos", ident, ident)
    # Not served: the server answers UNIMPLEMENTED.
    missing = ch.unary_unary("/demo.Greeter/Missing", ident, ident)
    def code_of(e):
        return e.code().name
    check_done = False
    for step in steps:
        kind, _, arg = step.partition(":")
        t0 = now()
        if kind in ("hello", "goodbye", "notfound", "missing"):
            stub = {"goodbye": goodbye, "missing": missing}.get(kind, hello)
            req = ("%s %s %s" % ("notfound" if kind == "notfound" else "hi", arg, PAYLOAD_MARK)).encode()
            try:
                reply = stub(req, timeout=10)
                out(step=step, code="OK", replies=[reply.decode()], start_ns=t0, end_ns=now())
            except grpc.RpcError as e:
                out(step=step, code=code_of(e), details=e.details(), replies=[], start_ns=t0, end_ns=now())
        elif kind == "stream":
            n, ms = arg.split(",")
            replies, times = [], []
            try:
                for r in streamer(("%s %s %s" % (n, ms, PAYLOAD_MARK)).encode(), timeout=20):
                    replies.append(r.decode()); times.append(now())
                code = "OK"
            except grpc.RpcError as e:
                code = code_of(e)
            out(step=step, code=code, replies=replies, reply_ns=times, start_ns=t0, end_ns=now())
        elif kind == "concurrent":
            n = int(arg)
            futs = [hello.future(("slow %d %s" % (i, PAYLOAD_MARK)).encode(), timeout=20) for i in range(n)]
            replies, codes = [], []
            for f in futs:
                try:
                    replies.append(f.result().decode()); codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(code_of(e))
            out(step=step, code="OK" if all(c == "OK" for c in codes) else ",".join(codes), replies=replies, start_ns=t0, end_ns=now())
        elif kind == "wait":
            print("waiting %s" % arg, flush=True)
            while not os.path.exists(arg):
                time.sleep(0.02)
            out(step=step, code="OK", replies=[], start_ns=t0, end_ns=now())
        elif kind == "sleep":
            time.sleep(int(arg) / 1000.0)
        else:
            sys.exit("unknown step %r" % step)
        if not check_done:
            check_library(); check_done = True
    ch.close()

if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        client(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
