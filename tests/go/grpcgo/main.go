// A grpc-go server and client over TLS without generated code (a
// hand-written ServiceDesc and a codec that passes bytes through), for
// Periscope's end-to-end tests. Built in GOPATH mode against Debian's
// grpc-go sources (/usr/share/gocode).
//
//	grpcgo serve CERT KEY
//	    Listens on 127.0.0.1 (a free port), prints "listening PORT", serves
//	    demo.Greeter/SayHello: NOT_FOUND for a name starting with
//	    "missing", else "hello NAME".
//	grpcgo call PORT NAME...
//	    One channel, one SayHello call per NAME in turn; prints
//	    "reply NAME CODE" for each.
//	grpcgo session PORT NAME...
//	    Dials one channel, calls SayHello("warm") on it, then on each
//	    SIGUSR1 calls SayHello once per NAME on the same channel (a channel
//	    dialed, and its HPACK tables filled, before a tracer started).
package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// bytesCodec is named "proto" so that the content-type is the usual
// application/grpc(+proto).
type bytesCodec struct{}

func (bytesCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (bytesCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (bytesCodec) Name() string   { return "proto" }
func (bytesCodec) String() string { return "proto" }

func sayHello(_ interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	name := string(in)
	if strings.HasPrefix(name, "missing") {
		return nil, status.Error(codes.NotFound, "no such greeting")
	}
	out := []byte("hello " + name)
	return &out, nil
}

var greeter = grpc.ServiceDesc{
	ServiceName: "demo.Greeter",
	HandlerType: (*interface{})(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "SayHello", Handler: sayHello}},
	Metadata:    "demo.proto",
}

func serve(cert, key string) error {
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	creds := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{pair}})
	s := grpc.NewServer(grpc.Creds(creds), grpc.CustomCodec(bytesCodec{}))
	s.RegisterService(&greeter, struct{}{})
	fmt.Printf("listening %d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	return s.Serve(ln)
}

func dial(port string) (*grpc.ClientConn, error) {
	creds := credentials.NewTLS(&tls.Config{InsecureSkipVerify: true})
	return grpc.Dial("127.0.0.1:"+port, grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(bytesCodec{})), grpc.WithBlock())
}

func sayHellos(cc *grpc.ClientConn, names []string) {
	for _, name := range names {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		in := []byte(name)
		var out []byte
		err := cc.Invoke(ctx, "/demo.Greeter/SayHello", &in, &out)
		cancel()
		fmt.Printf("reply %s %s\n", name, status.Code(err))
	}
	os.Stdout.Sync()
}

func call(port string, names []string) error {
	cc, err := dial(port)
	if err != nil {
		return err
	}
	defer cc.Close()
	sayHellos(cc, names)
	return nil
}

func session(port string, names []string) error {
	cc, err := dial(port)
	if err != nil {
		return err
	}
	defer cc.Close()
	again := make(chan os.Signal, 1)
	signal.Notify(again, syscall.SIGUSR1)
	sayHellos(cc, []string{"warm"})
	for range again {
		sayHellos(cc, names)
	}
	return nil
}

func main() {
	var err error
	switch {
	case len(os.Args) >= 4 && os.Args[1] == "serve":
		err = serve(os.Args[2], os.Args[3])
	case len(os.Args) >= 4 && os.Args[1] == "call":
		err = call(os.Args[2], os.Args[3:])
	case len(os.Args) >= 4 && os.Args[1] == "session":
		err = session(os.Args[2], os.Args[3:])
	default:
		err = fmt.Errorf("usage: grpcgo serve CERT KEY | call PORT NAME...")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
