// A Go HTTPS server and client built from the standard library only, for
// Periscope's end-to-end tests (it is never instrumented: the agent must
// see it through uprobes on crypto/tls and net/http).
//
//	httpsgo serve CERT KEY [BACKEND_BASE_URL]
//	    Listens on 127.0.0.1 (a free port; plain HTTP when CERT is "-"),
//	    prints "listening PORT", serves
//	    /hello (200), /missing (404), and /call/REST, which GETs
//	    BACKEND_BASE_URL/REST with one shared http.Client (HTTP/1.1 unless
//	    GO_HTTP2_CLIENT=1) and answers with the backend's status.
//	httpsgo get URL N
//	    N sequential GETs on one client, one "status N" line each.
package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func client() *http.Client {
	transport := &http.Transport{
		TLSClientConfig:     &tls.Config{InsecureSkipVerify: true},
		MaxIdleConnsPerHost: 4,
		ForceAttemptHTTP2:   os.Getenv("GO_HTTP2_CLIENT") == "1",
	}
	return &http.Client{Transport: transport, Timeout: 10 * time.Second}
}

func serve(cert, key, backend string) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	c := client()
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from go\n")
	})
	mux.HandleFunc("/call/", func(w http.ResponseWriter, r *http.Request) {
		rest := strings.TrimPrefix(r.URL.Path, "/call/")
		resp, err := c.Get(backend + "/" + rest)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		w.WriteHeader(resp.StatusCode)
		w.Write(body)
	})
	srv := &http.Server{Handler: mux}
	if cert == "-" {
		fmt.Printf("listening %d\n", ln.Addr().(*net.TCPAddr).Port)
		os.Stdout.Sync()
		return srv.Serve(ln)
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return err
	}
	srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{pair}}
	fmt.Printf("listening %d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	return srv.ServeTLS(ln, "", "")
}

func get(url string, n int) error {
	c := client()
	for i := 0; i < n; i++ {
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		fmt.Printf("status %d\n", resp.StatusCode)
	}
	return nil
}

func main() {
	var err error
	switch {
	case len(os.Args) >= 4 && os.Args[1] == "serve":
		backend := ""
		if len(os.Args) >= 5 {
			backend = os.Args[4]
		}
		err = serve(os.Args[2], os.Args[3], backend)
	case len(os.Args) == 4 && os.Args[1] == "get":
		var n int
		fmt.Sscanf(os.Args[3], "%d", &n)
		err = get(os.Args[2], n)
	default:
		err = fmt.Errorf("usage: httpsgo serve CERT KEY [BACKEND] | get URL N")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
