// The program `cargo xtask go-offsets` and the go_offsets tests build with
// each Go toolchain to read struct layouts from its DWARF. It must keep
// crypto/tls.Conn, net.TCPConn (net.conn, net.netFD, internal/poll.FD) and
// the runtime in the binary; it is never run for real work.
package main

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
)

func main() {
	var tlsConn *tls.Conn
	var tcpConn *net.TCPConn
	fmt.Println(tlsConn, tcpConn)
	if len(os.Args) > 1 {
		_ = http.ListenAndServeTLS(os.Args[1], "", "", nil)
		_, _ = http.Get("https://" + os.Args[1])
	}
}
