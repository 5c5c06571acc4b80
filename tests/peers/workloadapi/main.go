// workloadapi is a SPIFFE workload written with go-spiffe, the Go library
// SPIRE's own workloads use, and nothing of meshca: it finds the Workload API
// through SPIFFE_ENDPOINT_SOCKET, as any SPIFFE client does.
//
//	workloadapi fetch AUDIENCE
//	workloadapi serve AUTHORIZED-ID      (one mutual-TLS connection on 127.0.0.1)
//	workloadapi dial HOST:PORT AUTHORIZED-ID
//	workloadapi watch SERIALS AUTHORITIES
//
// fetch gets its X.509-SVID and checks it with x509svid.Verify against the
// bundles of FetchX509Bundles; gets a JWT-SVID of that SPIFFE ID for AUDIENCE
// (and AUDIENCE-2) and validates it
// with jwtsvid.ParseAndValidate against FetchJWTBundles and with the Workload
// API's ValidateJWTSVID; and checks that both refuse another audience.
//
// serve prints {"listening": "127.0.0.1:PORT"}, accepts one connection with
// tlsconfig.MTLSServerConfig over an X509Source, authorizing only
// AUTHORIZED-ID, reads "ping" and answers "pong ping". dial connects with
// spiffetls (mutual TLS, authorizing only AUTHORIZED-ID), sends "ping" and
// reads the answer.
//
// watch prints {"spiffe_id": ..., "authorities": N} when its X509Source is
// ready, then follows it until it has held SERIALS different X.509-SVIDs
// (renewals) and a bundle of its trust domain with AUTHORITIES anchors.
//
// Each mode prints one JSON line of results and exits 0, or prints one JSON
// line {"error": ..., "code": GRPC-CODE} and exits 1.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/status"
)

const deadline = 30 * time.Second // every mode stops by itself

func emit(v map[string]any) {
	line, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(line))
}

func fail(what string, err error) {
	code := "" // a gRPC status code where the error carries one
	if s, ok := status.FromError(err); ok {
		code = s.Code().String()
	}
	emit(map[string]any{"error": fmt.Sprintf("%s: %v", what, err), "code": code})
	os.Exit(1)
}

func fetch(ctx context.Context, audience string) {
	svid, err := workloadapi.FetchX509SVID(ctx)
	if err != nil {
		fail("FetchX509SVID", err)
	}
	bundles, err := workloadapi.FetchX509Bundles(ctx)
	if err != nil {
		fail("FetchX509Bundles", err)
	}
	verified, chains, err := x509svid.Verify(svid.Certificates, bundles)
	if err != nil {
		fail("x509svid.Verify", err)
	}
	trustDomains := []string{}
	authorities := 0
	for _, b := range bundles.Bundles() {
		trustDomains = append(trustDomains, b.TrustDomain().String())
		authorities += len(b.X509Authorities())
	}
	sort.Strings(trustDomains)

	// Subject and a second audience: the request's spiffe_id and repeated audience fields.
	params := jwtsvid.Params{Audience: audience, ExtraAudiences: []string{audience + "-2"}, Subject: svid.ID}
	jwt, err := workloadapi.FetchJWTSVID(ctx, params)
	if err != nil {
		fail("FetchJWTSVID", err)
	}
	jwtBundles, err := workloadapi.FetchJWTBundles(ctx)
	if err != nil {
		fail("FetchJWTBundles", err)
	}
	jwtBundle, err := jwtBundles.GetJWTBundleForTrustDomain(jwt.ID.TrustDomain())
	if err != nil {
		fail("JWT bundle of the SVID's trust domain", err)
	}
	parsed, err := jwtsvid.ParseAndValidate(jwt.Marshal(), jwtBundles, []string{audience})
	if err != nil {
		fail("jwtsvid.ParseAndValidate", err)
	}
	validated, err := workloadapi.ValidateJWTSVID(ctx, jwt.Marshal(), audience)
	if err != nil {
		fail("ValidateJWTSVID", err)
	}
	other := audience + "-other"
	_, localRefusal := jwtsvid.ParseAndValidate(jwt.Marshal(), jwtBundles, []string{other})
	_, apiRefusal := workloadapi.ValidateJWTSVID(ctx, jwt.Marshal(), other)
	if localRefusal == nil || apiRefusal == nil {
		fail("a JWT-SVID for another audience", errors.New("was accepted"))
	}

	emit(map[string]any{
		"spiffe_id":             svid.ID.String(),
		"chain_length":          len(svid.Certificates),
		"verified_id":           verified.String(),
		"verified_chain_length": len(chains[0]),
		"bundle_trust_domains":  trustDomains,
		"x509_authorities":      authorities,
		"jwt_spiffe_id":         jwt.ID.String(),
		"jwt_audience":          jwt.Audience,
		"jwt_authorities":       len(jwtBundle.JWTAuthorities()),
		"jwt_parsed_id":         parsed.ID.String(),
		"jwt_validated_id":      validated.ID.String(),
		"other_audience_local":  localRefusal.Error(),
		"other_audience_api":    status.Code(apiRefusal).String(),
	})
}

func authorized(arg string) tlsconfig.Authorizer {
	id, err := spiffeid.FromString(arg)
	if err != nil {
		fail("AUTHORIZED-ID", err)
	}
	return tlsconfig.AuthorizeID(id)
}

func source(ctx context.Context) *workloadapi.X509Source {
	src, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		fail("NewX509Source", err)
	}
	return src
}

func serve(ctx context.Context, authorizedID string) {
	authorizer := authorized(authorizedID)
	src := source(ctx)
	defer src.Close()
	svid, err := src.GetX509SVID()
	if err != nil {
		fail("X509Source.GetX509SVID", err)
	}
	listener, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		fail("listen", err)
	}
	defer listener.Close()
	emit(map[string]any{"listening": listener.Addr().String(), "spiffe_id": svid.ID.String()})
	_ = listener.SetDeadline(time.Now().Add(deadline))
	conn, err := listener.Accept()
	if err != nil {
		fail("accept", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(deadline))
	tlsConn := tls.Server(conn, tlsconfig.MTLSServerConfig(src, src, authorizer))
	if err := tlsConn.HandshakeContext(ctx); err != nil {
		fail("handshake", err)
	}
	peer, err := x509svid.IDFromCert(tlsConn.ConnectionState().PeerCertificates[0])
	if err != nil {
		fail("the client's SPIFFE ID", err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(tlsConn, buf); err != nil {
		fail("read", err)
	}
	if _, err := tlsConn.Write(append([]byte("pong "), buf...)); err != nil {
		fail("write", err)
	}
	emit(map[string]any{"peer_id": peer.String(), "received": string(buf)})
}

func dial(ctx context.Context, addr, authorizedID string) {
	authorizer := authorized(authorizedID)
	src := source(ctx)
	defer src.Close()
	conn, err := spiffetls.DialWithMode(ctx, "tcp", addr, spiffetls.MTLSClientWithSource(authorizer, src))
	if err != nil {
		fail("spiffetls.DialWithMode", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(deadline))
	peer, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		fail("the server's SPIFFE ID", err)
	}
	if _, err := conn.Write([]byte("ping")); err != nil {
		fail("write", err)
	}
	reply, err := io.ReadAll(conn)
	if err != nil && len(reply) == 0 {
		fail("read", err)
	}
	emit(map[string]any{"peer_id": peer.String(), "reply": string(reply)})
}

func watch(ctx context.Context, serials, authorities int) {
	src := source(ctx)
	defer src.Close()
	first, err := src.GetX509SVID()
	if err != nil {
		fail("X509Source.GetX509SVID", err)
	}
	bundle, err := src.GetX509BundleForTrustDomain(first.ID.TrustDomain())
	if err != nil {
		fail("X509Source.GetX509BundleForTrustDomain", err)
	}
	emit(map[string]any{"spiffe_id": first.ID.String(), "authorities": len(bundle.X509Authorities())})
	seen := map[string]bool{}
	anchors := 0
	for len(seen) < serials || anchors != authorities {
		svid, err := src.GetX509SVID()
		if err != nil {
			fail("X509Source.GetX509SVID", err)
		}
		seen[svid.Certificates[0].SerialNumber.String()] = true
		bundle, err := src.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
		if err != nil {
			fail("X509Source.GetX509BundleForTrustDomain", err)
		}
		anchors = len(bundle.X509Authorities())
		select {
		case <-ctx.Done():
			fail("watch", fmt.Errorf("%d SVIDs and %d anchors seen: %w", len(seen), anchors, ctx.Err()))
		case <-time.After(50 * time.Millisecond):
		}
	}
	svid, _ := src.GetX509SVID()
	emit(map[string]any{"spiffe_id": svid.ID.String(), "serials": len(seen), "authorities": anchors})
}

func count(arg string) int {
	n, err := strconv.Atoi(arg)
	if err != nil || n < 1 {
		fail("a count", fmt.Errorf("%q is not a positive number", arg))
	}
	return n
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	args := os.Args[1:]
	switch {
	case len(args) == 2 && args[0] == "fetch":
		fetch(ctx, args[1])
	case len(args) == 2 && args[0] == "serve":
		serve(ctx, args[1])
	case len(args) == 3 && args[0] == "dial":
		dial(ctx, args[1], args[2])
	case len(args) == 3 && args[0] == "watch":
		watch(ctx, count(args[1]), count(args[2]))
	default:
		fmt.Fprintln(os.Stderr, "usage: workloadapi fetch AUDIENCE | serve AUTHORIZED-ID | dial HOST:PORT AUTHORIZED-ID | watch SERIALS AUTHORITIES")
		os.Exit(2)
	}
}
