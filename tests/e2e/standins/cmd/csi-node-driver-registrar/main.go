// Stand-in for kubernetes-csi/node-driver-registrar, which the Go module proxy
// does not serve: registers the driver with the kubelet's plugin watcher
// (pluginregistration v1) under the name its GetPluginInfo reports, with the
// flags deploy/ passes. --http-endpoint serves /healthz as upstream does (v2.x):
// 200 only while the registration socket exists and answers GetInfo with the
// driver's name, so a liveness probe on it restarts a registrar the kubelet can
// no longer reach. --mode=kubelet-registration-probe (deprecated upstream, where
// it checks nothing) succeeds once the kubelet has confirmed the registration
// (a marker file in this container's /tmp).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint, marker string
}

func (r *registrar) GetInfo(ctx context.Context, _ *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(ctx context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		log.Printf("kubelet refused the registration: %s", s.Error)
		os.Remove(r.marker)
		os.Exit(1)
	}
	log.Printf("registered with the kubelet as %s", r.name)
	if err := os.WriteFile(r.marker, []byte(r.name+"\n"), 0o644); err != nil {
		log.Printf("marker: %v", err)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI socket in this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the CSI socket's path on the host")
	regDir := flag.String("plugin-registration-path", "/registration", "kubelet plugin registration directory")
	mode := flag.String("mode", "registration", "registration or kubelet-registration-probe")
	httpEndpoint := flag.String("http-endpoint", "", "address of the HTTP server for /healthz (none when empty)")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	// The probe runs in this container with only --kubelet-registration-path.
	const marker = "/tmp/kubelet-registered"
	if *mode == "kubelet-registration-probe" {
		if _, err := os.Stat(marker); err != nil {
			fmt.Fprintf(os.Stderr, "not registered: %v\n", err)
			os.Exit(1)
		}
		return
	}
	os.Remove(marker)

	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("csi connection: %v", err)
	}
	var name string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			name = info.GetName()
			break
		}
		log.Printf("waiting for the driver: %v", err)
		time.Sleep(2 * time.Second)
	}
	sock := filepath.Join(*regDir, name+"-reg.sock")
	os.Remove(sock)
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatalf("listen %s: %v", sock, err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registrar{name: name, endpoint: *kubeletPath, marker: marker})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		srv.Stop()
		os.Remove(sock)
		os.Remove(marker)
		os.Exit(0)
	}()
	if *httpEndpoint != "" {
		go serveHealth(*httpEndpoint, sock, name)
	}
	log.Printf("serving registration for %s at %s (driver socket on the host: %s)", name, sock, *kubeletPath)
	log.Fatal(srv.Serve(lis))
}

// serveHealth answers /healthz: 200 while the registration socket exists and
// answers GetInfo with the driver's name (what the kubelet's plugin watcher
// calls), 404 when the socket is gone, 500 when it does not answer right.
func serveHealth(endpoint, sock, name string) {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
			http.Error(w, fmt.Sprintf("registration socket %s: not there (%v)", sock, err), http.StatusNotFound)
			return
		}
		if err := checkRegistrationSocket(r.Context(), sock, name); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	log.Fatal(http.ListenAndServe(endpoint, mux))
}

func checkRegistrationSocket(ctx context.Context, sock, name string) error {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("registration socket %s: %v", sock, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	info, err := registerapi.NewRegistrationClient(conn).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		return fmt.Errorf("registration socket %s: GetInfo: %v", sock, err)
	}
	if info.GetName() != name {
		return fmt.Errorf("registration socket %s answers for %q, not %q", sock, info.GetName(), name)
	}
	return nil
}
