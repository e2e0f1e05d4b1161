// Command verify checks a running fount ledger with Go's golang.org/x/mod/sumdb/tlog and
// sumdb/note, code fount did not write: it fetches /ledger/checkpoint and the C2SP tiles,
// verifies the checkpoint's signature with the log's verifier key, recomputes the tree's root
// from the tiles, and proves every entry (and every given provenance.json) included.
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o ledger-verify ./tools/ledger/verify
//	ledger-verify -url http://127.0.0.1:8000 -key "$(fount ledger key)" [provenance.json ...]
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

var base string

func get(path string) ([]byte, error) {
	resp, err := http.Get(base + "/ledger/" + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("GET /ledger/%s: %s", path, resp.Status)
	}
	return body, nil
}

// c2spPath maps Go's tile path (tile/8/L/N, tile/8/data/N) to C2SP tlog-tiles (tile/L/N,
// tile/entries/N).
func c2spPath(t tlog.Tile) string {
	p := strings.TrimPrefix(t.Path(), "tile/8/")
	if strings.HasPrefix(p, "data/") {
		p = "entries/" + strings.TrimPrefix(p, "data/")
	}
	return "tile/" + p
}

type tiles struct{}

func (tiles) Height() int { return 8 }

func (tiles) ReadTiles(ts []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(ts))
	for i, t := range ts {
		b, err := get(c2spPath(t))
		if err != nil {
			return nil, err
		}
		out[i] = b
	}
	return out, nil
}

func (tiles) SaveTiles([]tlog.Tile, [][]byte) {}

type checkpoint struct {
	origin string
	tree   tlog.Tree
}

// open verifies a signed checkpoint note and parses its body (C2SP tlog-checkpoint).
func open(msg []byte, v note.Verifier) (checkpoint, error) {
	n, err := note.Open(msg, note.VerifierList(v))
	if err != nil {
		return checkpoint{}, fmt.Errorf("checkpoint signature: %v", err)
	}
	lines := strings.Split(n.Text, "\n")
	if len(lines) < 4 {
		return checkpoint{}, fmt.Errorf("malformed checkpoint %q", n.Text)
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		return checkpoint{}, fmt.Errorf("checkpoint size: %v", err)
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil {
		return checkpoint{}, fmt.Errorf("checkpoint root: %v", err)
	}
	if lines[0] != v.Name() {
		return checkpoint{}, fmt.Errorf("checkpoint of %q, not %q", lines[0], v.Name())
	}
	return checkpoint{lines[0], tlog.Tree{N: size, Hash: root}}, nil
}

// entries reads entry bundle N (C2SP: each entry a big-endian uint16 length then its bytes).
func entries(n, width int64) ([][]byte, error) {
	t := tlog.Tile{H: 8, L: -1, N: n, W: int(width)}
	b, err := get(c2spPath(t))
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for len(b) > 0 {
		if len(b) < 2 {
			return nil, fmt.Errorf("entry bundle %d is truncated", n)
		}
		l := int(binary.BigEndian.Uint16(b))
		if len(b) < 2+l {
			return nil, fmt.Errorf("entry bundle %d is truncated", n)
		}
		out = append(out, b[2:2+l])
		b = b[2+l:]
	}
	if int64(len(out)) != width {
		return nil, fmt.Errorf("entry bundle %d has %d entries, not %d", n, len(out), width)
	}
	return out, nil
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "ledger-verify: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	url := flag.String("url", "", "the fount server (http://host:port)")
	key := flag.String("key", "", "the log's verifier key (fount ledger key)")
	flag.Parse()
	base = strings.TrimSuffix(*url, "/")
	v, err := note.NewVerifier(*key)
	if err != nil {
		fail("verifier key: %v", err)
	}
	msg, err := get("checkpoint")
	if err != nil {
		fail("%v", err)
	}
	c, err := open(msg, v)
	if err != nil {
		fail("%v", err)
	}
	hr := tlog.TileHashReader(c.tree, tiles{})
	root, err := tlog.TreeHash(c.tree.N, hr)
	if err != nil {
		fail("tiles: %v", err)
	}
	if root != c.tree.Hash {
		fail("the tiles hash to %v, the checkpoint says %v", root, c.tree.Hash)
	}
	// every entry: its record hash is proven included in the signed tree
	var all [][]byte
	for n := int64(0); n*256 < c.tree.N; n++ {
		w := c.tree.N - n*256
		if w > 256 {
			w = 256
		}
		es, err := entries(n, w)
		if err != nil {
			fail("%v", err)
		}
		all = append(all, es...)
	}
	for i, e := range all {
		p, err := tlog.ProveRecord(c.tree.N, int64(i), hr)
		if err != nil {
			fail("proving entry %d: %v", i, err)
		}
		if err := tlog.CheckRecord(p, c.tree.N, c.tree.Hash, int64(i), tlog.RecordHash(e)); err != nil {
			fail("entry %d is not in the tree: %v", i, err)
		}
		var st map[string]interface{}
		if err := json.Unmarshal(e, &st); err != nil || st["_type"] != "https://in-toto.io/Statement/v1" {
			fail("entry %d is not an in-toto Statement v1", i)
		}
	}
	// provenance files: their entry is the log's, their offline proof verifies, and the log
	// still extends the checkpoint that proof was made against
	for _, path := range flag.Args() {
		raw, err := os.ReadFile(path)
		if err != nil {
			fail("%v", err)
		}
		var prov struct {
			Index int64  `json:"index"`
			Leaf  string `json:"leaf"`
			Proof string `json:"proof"`
		}
		if err := json.Unmarshal(raw, &prov); err != nil {
			fail("%s: %v", path, err)
		}
		leaf, err := base64.StdEncoding.DecodeString(prov.Leaf)
		if err != nil {
			fail("%s: leaf: %v", path, err)
		}
		if prov.Index >= int64(len(all)) || !bytes.Equal(all[prov.Index], leaf) {
			fail("%s: entry %d is not the log's entry %d", path, prov.Index, prov.Index)
		}
		parts := strings.SplitN(prov.Proof, "\n\n", 2)
		if len(parts) != 2 {
			fail("%s: malformed tlog-proof", path)
		}
		head := strings.Split(parts[0], "\n")
		if head[0] != "c2sp.org/tlog-proof@v1" || head[1] != fmt.Sprintf("index %d", prov.Index) {
			fail("%s: malformed tlog-proof header", path)
		}
		var rp tlog.RecordProof
		for _, l := range head[2:] {
			h, err := tlog.ParseHash(l)
			if err != nil {
				fail("%s: proof hash: %v", path, err)
			}
			rp = append(rp, h)
		}
		then, err := open([]byte(parts[1]), v)
		if err != nil {
			fail("%s: %v", path, err)
		}
		if err := tlog.CheckRecord(rp, then.tree.N, then.tree.Hash, prov.Index, tlog.RecordHash(leaf)); err != nil {
			fail("%s: inclusion proof: %v", path, err)
		}
		tp, err := tlog.ProveTree(c.tree.N, then.tree.N, hr)
		if err != nil {
			fail("%s: consistency proof: %v", path, err)
		}
		if err := tlog.CheckTree(tp, c.tree.N, c.tree.Hash, then.tree.N, then.tree.Hash); err != nil {
			fail("%s: the log does not extend its checkpoint: %v", path, err)
		}
	}
	fmt.Printf("ok: %s checkpoint of %d entries signed by %s; the tiles hash to its root; every entry is included; %d provenance file(s) proven\n",
		c.origin, c.tree.N, v.Name(), len(flag.Args()))
}
