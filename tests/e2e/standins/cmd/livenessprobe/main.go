// Stand-in for kubernetes-csi/livenessprobe, which the Go module proxy does not
// serve: the same flags deploy/ passes, /healthz answers with the driver's
// Identity Probe (200 when ready, 500 otherwise).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI socket")
	port := flag.String("health-port", "9808", "port of /healthz")
	timeout := flag.Duration("probe-timeout", time.Second, "Probe timeout")
	flag.Parse()
	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("csi connection: %v", err)
	}
	id := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *timeout)
		defer cancel()
		resp, err := id.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprintf(w, "probe failed: %v\n", err)
			log.Printf("probe failed: %v", err)
			return
		}
		if r := resp.GetReady(); r != nil && !r.GetValue() {
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprintln(w, "driver not ready")
			return
		}
		fmt.Fprintln(w, "ok")
	})
	log.Printf("serving /healthz on :%s for %s", *port, *csiAddress)
	log.Fatal(http.ListenAndServe(":"+*port, nil))
}
