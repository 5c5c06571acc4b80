// x509verify checks meshca's X.509-SVIDs with Go's crypto/x509, the verifier
// go-spiffe, Envoy's Go control planes and SPIRE build on.
//
//	x509verify BUNDLE.pem CHAIN.pem SPIFFE-ID UNIX-SECONDS
//
// It prints "ok" and exits 0 when CHAIN (leaf first) verifies against the
// anchors in BUNDLE at the given time and the leaf's only URI SAN is SPIFFE-ID;
// otherwise it prints the reason and exits 1.
package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"strconv"
	"time"
)

func certs(path string) []*x509.Certificate {
	data, err := os.ReadFile(path)
	if err != nil {
		fail(err.Error())
	}
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return out
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			fail("parse: " + err.Error())
		}
		out = append(out, cert)
	}
}

func fail(reason string) {
	fmt.Println(reason)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 5 {
		fail("usage: x509verify BUNDLE.pem CHAIN.pem SPIFFE-ID UNIX-SECONDS")
	}
	at, err := strconv.ParseInt(os.Args[4], 10, 64)
	if err != nil {
		fail(err.Error())
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range certs(os.Args[1]) {
		roots.AddCert(c)
	}
	chain := certs(os.Args[2])
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	leaf := chain[0]
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   time.Unix(at, 0),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		fail("verify: " + err.Error())
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != os.Args[3] {
		fail(fmt.Sprintf("URI SANs %v, want exactly %s", leaf.URIs, os.Args[3]))
	}
	fmt.Println("ok")
}
