// Command vectors writes RFC 6962 proof vectors computed by Go's golang.org/x/mod/sumdb/tlog
// (a Merkle tree implementation fount did not write) for crates/fount-ledger/tests: roots of every
// size up to N, every inclusion proof and every consistency proof among them.
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go run tools/ledger/vectors/main.go \
//	    > crates/fount-ledger/tests/golden/tlog_vectors.json
package main

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"

	"golang.org/x/mod/sumdb/tlog"
)

const n = 24

type inclusion struct {
	Index int64    `json:"index"`
	Size  int64    `json:"size"`
	Proof []string `json:"proof"`
}

type consistency struct {
	Old   int64    `json:"old"`
	New   int64    `json:"new"`
	Proof []string `json:"proof"`
}

func main() {
	// the first eight are RFC 6962's test leaves (certificate-transparency's merkle_tree_test)
	leaves := []string{"", "00", "10", "2021", "3031", "40414243", "5051525354555657",
		"606162636465666768696a6b6c6d6e6f"}
	for i := len(leaves); i < n; i++ {
		leaves = append(leaves, hex.EncodeToString([]byte(fmt.Sprintf("fount entry %d", i))))
	}
	var stored []tlog.Hash
	reader := tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(idx))
		for i, x := range idx {
			out[i] = stored[x]
		}
		return out, nil
	})
	b64 := func(hs []tlog.Hash) []string {
		out := []string{}
		for _, h := range hs {
			out = append(out, base64.StdEncoding.EncodeToString(h[:]))
		}
		return out
	}
	for i, l := range leaves {
		data, err := hex.DecodeString(l)
		check(err)
		hs, err := tlog.StoredHashes(int64(i), data, reader)
		check(err)
		stored = append(stored, hs...)
	}
	var roots []string
	for size := int64(0); size <= n; size++ {
		h, err := tlog.TreeHash(size, reader)
		check(err)
		roots = append(roots, base64.StdEncoding.EncodeToString(h[:]))
	}
	var incl []inclusion
	var cons []consistency
	for size := int64(1); size <= n; size++ {
		for i := int64(0); i < size; i++ {
			p, err := tlog.ProveRecord(size, i, reader)
			check(err)
			incl = append(incl, inclusion{i, size, b64(p)})
		}
		for old := int64(1); old < size; old++ {
			p, err := tlog.ProveTree(size, old, reader)
			check(err)
			cons = append(cons, consistency{old, size, b64(p)})
		}
	}
	out, err := json.MarshalIndent(map[string]interface{}{
		"leaves": leaves, "roots": roots, "inclusion": incl, "consistency": cons,
	}, "", " ")
	check(err)
	os.Stdout.Write(append(out, '\n'))
}

func check(err error) {
	if err != nil {
		panic(err)
	}
}
