// Command search-front stands in front of Jaeger's query HTTP port and makes the UI's trace
// search exact per span; every other request passes through unchanged.
//
// Why: Jaeger's Badger store (and Cassandra) answers a search per TRACE. Asked for
// tags={"forward.mode":"decode"}&minDuration=150ms, it intersects the traces holding some span
// tagged forward.mode=decode with the traces holding some span of at least 150 ms. A timeline
// window is one trace whose root span lasts the whole window, so every window with a decode
// matches, even one whose slowest decode took 8 ms. This program asks Jaeger for more traces
// than the user asked for and keeps only those in which ONE span meets every condition.
//
// Standard library only; see usage below (search-front --help).
package main

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const usage = `search-front: Jaeger's query port, with the UI's trace search made exact per span.

It listens where users expect Jaeger (-listen) and reverse-proxies every request to Jaeger's
query HTTP port (-jaeger): the UI, /api/v3/*, /api/services, /api/traces/{id}, /api/metrics/*...

One request is answered differently: the UI's search, GET /api/traces?service=S&..., when it has
a condition that must hold on one span: tags (the JSON "tags" parameter and/or repeated
"tag=key:value"), minDuration / maxDuration (Go durations: 150ms, 1.5s) or operation.
Jaeger's Badger store matches each condition on ANY span of a trace, so a slow timeline root
plus a fast decode step count as "a slow decode". The front:
  1. asks Jaeger the same search with limit x FACTOR (at most MAX traces);
  2. keeps the traces in which a single span has the asked service, the operation (if given),
     every asked tag (its value compared as a string, on the span or on its process) and a
     duration within [minDuration, maxDuration];
  3. answers at most limit of them, in Jaeger's order and its response shape.
If Jaeger returned its full page of candidates and fewer than limit matched, more matches may
lie beyond: the answer's "errors" list says so, and how to narrow the search. Searches without
such a condition, requests it cannot parse, and Jaeger's error answers pass through untouched.
One log line per filtered search: asked, candidates, kept, ms.

Cost: every candidate is a whole trace (a window of up to 500 steps) that Jaeger reads and
sends, so a filtered search costs about FACTOR times the plain one. Raise -factor when matches
are rare and the notice shows often; lower it when searches are slow.

Flags (each also read from the environment variable named in brackets):
`

func main() {
	listen := flag.String("listen", envOr("SEARCH_FRONT_LISTEN", "127.0.0.1:16686"),
		"address to listen on [SEARCH_FRONT_LISTEN]")
	jaeger := flag.String("jaeger", envOr("SEARCH_FRONT_JAEGER", "http://127.0.0.1:16687"),
		"Jaeger's query HTTP base URL [SEARCH_FRONT_JAEGER]")
	factor := flag.Int("factor", envInt("SEARCH_FRONT_FACTOR", 5),
		"candidate traces asked of Jaeger per trace the search asks for [SEARCH_FRONT_FACTOR]")
	maxCandidates := flag.Int("max-candidates", envInt("SEARCH_FRONT_MAX_CANDIDATES", 1500),
		"never ask Jaeger for more traces than this in one search [SEARCH_FRONT_MAX_CANDIDATES]")
	probe := flag.String("probe", "",
		"GET this URL and exit 0 if it answers 200, else 1 (a health check for images without a shell)")
	flag.Usage = func() {
		fmt.Fprint(flag.CommandLine.Output(), usage)
		flag.PrintDefaults()
	}
	flag.Parse()
	if *probe != "" {
		os.Exit(probeURL(*probe))
	}
	upstream, err := url.Parse(*jaeger)
	if err != nil || upstream.Scheme == "" || upstream.Host == "" {
		log.Fatalf("search-front: -jaeger %q is not an http(s) URL", *jaeger)
	}
	if *factor < 1 || *maxCandidates < 1 {
		log.Fatalf("search-front: -factor and -max-candidates must be at least 1")
	}

	f := newFront(upstream, *factor, *maxCandidates)
	server := &http.Server{Addr: *listen, Handler: f, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(shutdown)
	}()
	log.Printf("search-front: listening on %s, Jaeger at %s, factor %d, at most %d candidates",
		*listen, upstream, *factor, *maxCandidates)
	if err := server.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("search-front: %v", err)
	}
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func envInt(name string, fallback int) int {
	v := os.Getenv(name)
	if v == "" {
		return fallback
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		log.Fatalf("search-front: %s=%q is not an integer", name, v)
	}
	return n
}

func probeURL(target string) int {
	client := http.Client{Timeout: 3 * time.Second}
	resp, err := client.Get(target)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintln(os.Stderr, resp.Status)
		return 1
	}
	return 0
}

// front is the handler: the search, or the reverse proxy.
type front struct {
	upstream      *url.URL
	proxy         *httputil.ReverseProxy
	client        *http.Client
	factor        int
	maxCandidates int
}

func newFront(upstream *url.URL, factor, maxCandidates int) *front {
	proxy := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		r.SetURL(upstream)
		r.SetXForwarded()
	}}
	// DisableCompression: the search sends Jaeger exactly the Accept-Encoding it can decode
	// (gzip or none), and decodes the answer itself (see search).
	client := &http.Client{Transport: &http.Transport{
		Proxy: nil, DisableCompression: true, MaxIdleConnsPerHost: 8, IdleConnTimeout: 90 * time.Second,
	}}
	return &front{upstream: upstream, proxy: proxy, client: client, factor: factor, maxCandidates: maxCandidates}
}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Path == "/api/traces" {
		if q, ok := parseSearch(r.URL.Query()); ok {
			f.search(w, r, q)
			return
		}
	}
	f.proxy.ServeHTTP(w, r)
}

// query is what one span must satisfy, all conditions together.
type query struct {
	service     string
	operation   string
	tags        map[string]string
	minDuration time.Duration // 0: no lower bound
	maxDuration time.Duration // 0: no upper bound
	limit       int
}

// Jaeger's own default when the search gives no limit.
const defaultLimit = 100

// parseSearch reads a search as Jaeger reads it. ok is false when there is nothing to check per
// span (a plain service search), when trace ids are given (no search), and when Jaeger would
// refuse the request: then Jaeger answers, with its own message.
func parseSearch(v url.Values) (query, bool) {
	q := query{service: v.Get("service"), operation: v.Get("operation"), tags: map[string]string{}}
	if q.service == "" || len(v["traceID"]) > 0 {
		return q, false
	}
	for _, tag := range v["tag"] {
		key, value, found := strings.Cut(tag, ":")
		if !found {
			return q, false
		}
		q.tags[key] = value
	}
	for _, tags := range v["tags"] {
		var m map[string]string
		if json.Unmarshal([]byte(tags), &m) != nil {
			return q, false
		}
		for key, value := range m {
			q.tags[key] = value
		}
	}
	var err error
	if s := v.Get("minDuration"); s != "" {
		if q.minDuration, err = time.ParseDuration(s); err != nil {
			return q, false
		}
	}
	if s := v.Get("maxDuration"); s != "" {
		if q.maxDuration, err = time.ParseDuration(s); err != nil {
			return q, false
		}
	}
	if q.minDuration != 0 && q.maxDuration != 0 && q.maxDuration < q.minDuration {
		return q, false
	}
	q.limit = defaultLimit
	if s := v.Get("limit"); s != "" {
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil {
			return q, false
		}
		if n > 0 {
			q.limit = int(n)
		}
	}
	perSpan := len(q.tags) > 0 || q.minDuration != 0 || q.maxDuration != 0 || q.operation != ""
	return q, perSpan
}

// The parts of Jaeger's JSON trace (its UI model) that the conditions read.
type keyValue struct {
	Key   string          `json:"key"`
	Value json.RawMessage `json:"value"`
}

// text is the tag's value as the search compares it: a string as is, a number or a boolean as
// JSON spells it (4, 0.5, true).
func (kv keyValue) text() string {
	var s string
	if json.Unmarshal(kv.Value, &s) == nil {
		return s
	}
	return string(kv.Value)
}

type span struct {
	OperationName string     `json:"operationName"`
	Duration      int64      `json:"duration"` // microseconds
	ProcessID     string     `json:"processID"`
	Tags          []keyValue `json:"tags"`
}

type process struct {
	ServiceName string     `json:"serviceName"`
	Tags        []keyValue `json:"tags"`
}

type traceView struct {
	Spans     []span             `json:"spans"`
	Processes map[string]process `json:"processes"`
}

// matches: does one span of the trace satisfy every condition of q?
func (t *traceView) matches(q query) bool {
	for i := range t.Spans {
		s := &t.Spans[i]
		p := t.Processes[s.ProcessID]
		if p.ServiceName != q.service || (q.operation != "" && s.OperationName != q.operation) {
			continue
		}
		d := time.Duration(s.Duration) * time.Microsecond
		if (q.minDuration != 0 && d < q.minDuration) || (q.maxDuration != 0 && d > q.maxDuration) {
			continue
		}
		if hasTags(q.tags, s.Tags, p.Tags) {
			return true
		}
	}
	return false
}

func hasTags(want map[string]string, lists ...[]keyValue) bool {
	for key, value := range want {
		found := false
		for _, list := range lists {
			for _, kv := range list {
				if kv.Key == key && kv.text() == value {
					found = true
					break
				}
			}
			if found {
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// page is Jaeger's response shape; the traces stay as Jaeger wrote them.
type page struct {
	Data   []json.RawMessage `json:"data"`
	Total  int               `json:"total"`
	Limit  int               `json:"limit"`
	Offset int               `json:"offset"`
	Errors []json.RawMessage `json:"errors"`
}

func acceptsGzip(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if strings.EqualFold(strings.TrimSpace(coding), "gzip") && strings.ReplaceAll(params, " ", "") != "q=0" {
			return true
		}
	}
	return false
}

// Headers that belong to one connection, never forwarded (RFC 9110, 7.6.1).
var hopHeaders = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer",
	"Transfer-Encoding", "Upgrade", "Proxy-Authorization", "Proxy-Authenticate"}

func (f *front) search(w http.ResponseWriter, r *http.Request, q query) {
	started := time.Now()
	asked := min(q.limit*f.factor, f.maxCandidates)
	asked = max(asked, q.limit)
	values := r.URL.Query()
	values.Set("limit", strconv.Itoa(asked))
	target := *f.upstream
	target.Path = strings.TrimSuffix(f.upstream.Path, "/") + r.URL.Path
	target.RawQuery = values.Encode()

	out, err := http.NewRequestWithContext(r.Context(), http.MethodGet, target.String(), nil)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	out.Header = r.Header.Clone()
	for _, h := range hopHeaders {
		out.Header.Del(h)
	}
	// Only what this program can decode: gzip if the client takes it (then a gzipped error
	// answer passes through as is), else none.
	out.Header.Del("Accept-Encoding")
	if acceptsGzip(r) {
		out.Header.Set("Accept-Encoding", "gzip")
	}
	resp, err := f.client.Do(out)
	if err != nil {
		log.Printf("search-front: Jaeger at %s: %v", f.upstream, err)
		writeError(w, http.StatusBadGateway, fmt.Sprintf("search-front: Jaeger at %s: %v", f.upstream, err))
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		passThrough(w, resp)
		return
	}
	body := io.Reader(resp.Body)
	switch strings.ToLower(resp.Header.Get("Content-Encoding")) {
	case "":
	case "gzip":
		gz, err := gzip.NewReader(resp.Body)
		if err != nil {
			writeError(w, http.StatusBadGateway, "search-front: Jaeger's gzip answer: "+err.Error())
			return
		}
		defer gz.Close()
		body = gz
	default:
		writeError(w, http.StatusBadGateway, "search-front: Jaeger answered in an encoding it did not ask for: "+
			resp.Header.Get("Content-Encoding"))
		return
	}
	var got page
	if err := json.NewDecoder(body).Decode(&got); err != nil {
		writeError(w, http.StatusBadGateway, "search-front: Jaeger's answer is not its search JSON: "+err.Error())
		return
	}

	kept := make([]json.RawMessage, 0, min(q.limit, len(got.Data)))
	for _, raw := range got.Data {
		if len(kept) == q.limit {
			break
		}
		var t traceView
		if err := json.Unmarshal(raw, &t); err != nil {
			writeError(w, http.StatusBadGateway, "search-front: a trace in Jaeger's answer: "+err.Error())
			return
		}
		if t.matches(q) {
			kept = append(kept, raw)
		}
	}
	full := len(got.Data) >= asked
	if full && len(kept) < q.limit {
		notice, _ := json.Marshal(map[string]string{"msg": fmt.Sprintf(
			"search-front: Jaeger returned a full page of %d candidate traces, and %d of them hold one "+
				"span that meets every condition; more may lie beyond. Narrow the search: a shorter time "+
				"range (Lookback or a custom range), a higher Min Duration, an Operation or another tag, "+
				"or a higher Limit Results.", len(got.Data), len(kept))})
		got.Errors = append(got.Errors, notice)
	}
	log.Printf("search-front: search service=%q tags=%d operation=%q minDuration=%s maxDuration=%s "+
		"limit=%d asked=%d candidates=%d kept=%d full=%t ms=%d", q.service, len(q.tags), q.operation,
		q.minDuration, q.maxDuration, q.limit, asked, len(got.Data), len(kept), full,
		time.Since(started).Milliseconds())

	got.Data, got.Total = kept, len(kept)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Add("Vary", "Accept-Encoding")
	var dst io.Writer = w
	if acceptsGzip(r) {
		w.Header().Set("Content-Encoding", "gzip")
		gz := gzip.NewWriter(w)
		defer gz.Close()
		dst = gz
	}
	w.WriteHeader(http.StatusOK)
	if err := json.NewEncoder(dst).Encode(&got); err != nil {
		log.Printf("search-front: writing the answer: %v", err)
	}
}

// passThrough copies Jaeger's answer as it came: status, headers, body bytes.
func passThrough(w http.ResponseWriter, resp *http.Response) {
	for key, values := range resp.Header {
		for _, v := range values {
			w.Header().Add(key, v)
		}
	}
	for _, h := range hopHeaders {
		w.Header().Del(h)
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
}

// writeError answers in Jaeger's error shape, which the UI shows.
func writeError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"data": nil, "total": 0, "limit": 0, "offset": 0,
		"errors": []map[string]any{{"code": status, "msg": msg}},
	})
}
