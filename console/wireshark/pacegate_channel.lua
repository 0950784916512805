-- pacegate_channel.lua: Wireshark dissector for pacegate's post-quantum channel (docs/channel.md).
--
-- Dissects the TCP ports in the preference "pacegate.channel.ports" (default 8884, the
-- gateway -> hospital channel, and 8885, hospital -> cloud). Every frame is
--     type (1) | length (4) | body (length)
-- Protocol version 2. The two hellos and the Alert are in clear and fully dissected (offered
-- versions and suites, randoms, the ClientHello's time, client and server names and ML-DSA-65
-- signature, X25519 shares, the ML-KEM-768 encapsulation key and ciphertext, with their
-- sizes; the Alert's reason). A hello offering only version 1 (no longer spoken: peers refuse
-- it) is dissected in the version-1 layout; a hello of a version this file does not know is
-- flagged and its body shown undecoded, never guessed. Records
-- are AES-256-GCM: their content type is encrypted (as in TLS 1.3), so this dissector shows
-- the header, the ciphertext and tag, and *infers* what a record is from where it stands in
-- the handshake and from its size: ClientAuth and ServerAuth are the first record of each
-- side; a rekey is a KeyUpdate-sized client record answered by a KeyUpdateResponse-sized
-- server record, then a 17-byte KeyUpdateDone; a 17-byte server record outside a rekey is
-- the server's KeyUpdateRequest. A Close's reason (0 normal, 1 unauthorized, 2 protocol
-- error, 3 expired) is inside the encryption and cannot be shown. Inferred fields are marked
-- [generated] and say "inferred"; nothing here decrypts.
--
-- Frame types, version and suite numbers, sizes and limits are docs/channel.md's tables;
-- tests/test_wireshark.py checks them against pacegate.channel. An unknown frame type is
-- shown as such and skipped by its length (a newer peer may add one); a length above the
-- protocol's limit is flagged and the rest of the segment shown undecoded.
-- Install: pacegate wireshark install (or tshark -X lua_script:pacegate_channel.lua ...).

-- Installed as a plugin *and* given with -X lua_script: the first copy loaded wins (a
-- protocol cannot be registered twice; each script has its own globals, so ask Wireshark).
local already_loaded, existing = pcall(Dissector.get, "pacegate.channel")
if already_loaded and existing ~= nil then return end

local FRAME_HEADER_SIZE = 5
local FRAME_CLIENT_HELLO = 0x01
local FRAME_SERVER_HELLO = 0x02
local FRAME_ALERT = 0x15
local FRAME_RECORD = 0x17
local VERSION_1 = 0x0001
local VERSION_2 = 0x0002
local MAX_HELLO_BODY = 8192
local MAX_ALERT_BODY = 1
local MAX_FRAME_BODY = 1 + 65536 + 16 -- content type + 64 KiB fragment + tag
local TAG_SIZE = 16
local RANDOM_SIZE = 32
local X25519_SIZE = 32
local MLKEM768_PUBLIC_KEY_SIZE = 1184
local MLKEM768_CIPHERTEXT_SIZE = 1088
local MLDSA65_SIGNATURE_SIZE = 3309
local TIME_MS_SIZE = 8
local MAX_NAME_SIZE = 64
-- Record body sizes of the encrypted handshake and rekey messages (inner + tag).
local KEY_UPDATE_RECORD = 1 + 2 + X25519_SIZE + 2 + MLKEM768_PUBLIC_KEY_SIZE + TAG_SIZE -- 1237
local KEY_UPDATE_RESPONSE_RECORD = 1 + 2 + X25519_SIZE + 2 + MLKEM768_CIPHERTEXT_SIZE + TAG_SIZE -- 1141
local KEY_UPDATE_DONE_RECORD = 1 + TAG_SIZE -- 17
local KEY_UPDATE_REQUEST_RECORD = 1 + TAG_SIZE -- 17
local CLOSE_RECORD = 1 + 1 + TAG_SIZE -- 18
local AUTH_RECORD_OVERHEAD = 1 + 1 + 2 + MLDSA65_SIGNATURE_SIZE + TAG_SIZE -- + name length
local DEFAULT_PORTS = "8884-8885"

local frame_types = {
    [FRAME_CLIENT_HELLO] = "ClientHello",
    [FRAME_SERVER_HELLO] = "ServerHello",
    [FRAME_ALERT] = "Alert",
    [FRAME_RECORD] = "Record",
}
local versions = {
    [VERSION_1] = "pacegate-channel v1 (no longer spoken: refused)",
    [VERSION_2] = "pacegate-channel v2",
}
-- The versions whose hello layouts this file knows.
local KNOWN_VERSIONS = { [VERSION_1] = true, [VERSION_2] = true }
local alert_reasons = {
    [1] = "unauthorized (unknown client, bad signature, or another server's name)",
    [2] = "stale hello (clock too far off, or a replay)",
    [3] = "busy (too many handshakes from this client)",
    [4] = "unsupported (no common version or suite)",
}
local alert_short = { [1] = "unauthorized", [2] = "stale", [3] = "busy", [4] = "unsupported" }
local suites = { [0x0001] = "X25519 + ML-KEM-768, HKDF-SHA256, AES-256-GCM, ML-DSA-65" }

local proto = Proto("pacegate.channel", "pacegate post-quantum channel")

local f = {
    type = ProtoField.uint8("pacegate.channel.type", "Frame type", base.HEX, frame_types),
    length = ProtoField.uint32("pacegate.channel.length", "Body length", base.DEC),
    frame_size = ProtoField.uint32("pacegate.channel.frame_size", "Frame size (header + body)", base.DEC),
    offered_version = ProtoField.uint16("pacegate.channel.hello.offered_version", "Offered version", base.HEX, versions),
    offered_suite = ProtoField.uint16("pacegate.channel.hello.offered_suite", "Offered suite", base.HEX, suites),
    version = ProtoField.uint16("pacegate.channel.hello.version", "Chosen version", base.HEX, versions),
    suite = ProtoField.uint16("pacegate.channel.hello.suite", "Chosen suite", base.HEX, suites),
    random = ProtoField.bytes("pacegate.channel.hello.random", "Random"),
    time_ms = ProtoField.uint64("pacegate.channel.hello.time_ms", "Client time (Unix ms)", base.DEC),
    time = ProtoField.absolute_time("pacegate.channel.hello.time", "Client time", base.UTC),
    client_len = ProtoField.uint8("pacegate.channel.hello.client_length", "Client name length", base.DEC),
    client = ProtoField.string("pacegate.channel.hello.client", "Client name"),
    server_len = ProtoField.uint8("pacegate.channel.hello.server_length", "Server name length", base.DEC),
    server = ProtoField.string("pacegate.channel.hello.server", "Server name (the one the client means)"),
    sig_len = ProtoField.uint16("pacegate.channel.hello.signature_length", "ML-DSA-65 signature length", base.DEC),
    signature = ProtoField.bytes("pacegate.channel.hello.signature", "ML-DSA-65 signature (by the client's pinned key)"),
    layout = ProtoField.uint16("pacegate.channel.hello.layout", "Dissected as the layout of version", base.HEX, versions),
    alert_reason = ProtoField.uint8("pacegate.channel.alert.reason", "Alert reason", base.DEC, alert_reasons),
    x25519_len = ProtoField.uint16("pacegate.channel.hello.x25519_length", "X25519 public key length", base.DEC),
    x25519 = ProtoField.bytes("pacegate.channel.hello.x25519", "X25519 public key"),
    kem_len = ProtoField.uint16("pacegate.channel.hello.kem_length", "ML-KEM-768 length", base.DEC),
    kem_ek = ProtoField.bytes("pacegate.channel.hello.mlkem_ek", "ML-KEM-768 encapsulation key"),
    kem_ct = ProtoField.bytes("pacegate.channel.hello.mlkem_ct", "ML-KEM-768 ciphertext"),
    record_kind = ProtoField.string("pacegate.channel.record.kind", "Record (inferred)"),
    record_content = ProtoField.string("pacegate.channel.record.content", "Content (inferred)"),
    record_seq = ProtoField.uint64("pacegate.channel.record.seq", "Record sequence in this epoch and direction (inferred)", base.DEC),
    keys = ProtoField.string("pacegate.channel.record.keys", "Keys (inferred)"),
    epoch = ProtoField.uint32("pacegate.channel.record.epoch", "Key epoch (inferred)", base.DEC),
    ciphertext = ProtoField.bytes("pacegate.channel.record.ciphertext", "Encrypted content type and payload"),
    tag = ProtoField.bytes("pacegate.channel.record.tag", "AES-256-GCM tag"),
    rekey = ProtoField.uint32("pacegate.channel.rekey", "Rekey to epoch (inferred)", base.DEC),
    direction = ProtoField.string("pacegate.channel.direction", "Direction"),
    body = ProtoField.bytes("pacegate.channel.body", "Body (not decoded)"),
}
proto.fields = f

local ef = {
    unknown_type = ProtoExpert.new("pacegate.channel.unknown_type", "Frame type not known to this dissector",
        expert.group.UNDECODED, expert.severity.NOTE),
    too_large = ProtoExpert.new("pacegate.channel.too_large", "Frame longer than the protocol allows (a peer refuses it)",
        expert.group.MALFORMED, expert.severity.WARN),
    malformed = ProtoExpert.new("pacegate.channel.malformed", "Malformed hello or alert", expert.group.MALFORMED, expert.severity.WARN),
    unknown_version = ProtoExpert.new("pacegate.channel.unknown_version", "Protocol version not known to this dissector",
        expert.group.UNDECODED, expert.severity.NOTE),
    old_version = ProtoExpert.new("pacegate.channel.old_version", "Version 1 only: current peers refuse this hello",
        expert.group.PROTOCOL, expert.severity.WARN),
    rekey = ProtoExpert.new("pacegate.channel.rekey_seen", "Fresh hybrid KEM exchange (rekey)",
        expert.group.SEQUENCE, expert.severity.CHAT),
}
proto.experts = ef

proto.prefs.ports = Pref.range("TCP ports", DEFAULT_PORTS, "TCP ports of pacegate's post-quantum channels", 65535)

local tcp_stream = Field.new("tcp.stream")
local tcp_table = DissectorTable.get("tcp.port")
local registered = nil -- the ports string currently registered
local registered_ports = {}

-- Per TCP stream: what each side has sent so far (computed on the first pass, kept per frame
-- so that re-dissecting a packet in the GUI shows the same inference).
local streams = {}
local per_frame = {}

function proto.init()
    streams = {}
    per_frame = {}
end

local function state_of(id)
    local s = streams[id]
    if s == nil then
        s = { records = { client = 0, server = 0 }, epoch = { client = 0, server = 0 },
              seq = { client = 0, server = 0 }, rekey = nil }
        streams[id] = s
    end
    return s
end

local function vec16(tree, tvb, off, limit, f_len, f_val, want, what)
    if off + 2 > limit then return nil end
    local n = tvb(off, 2):uint()
    local li = tree:add(f_len, tvb(off, 2))
    if want ~= nil and n ~= want then
        li:add_proto_expert_info(ef.malformed, string.format("%s is %d bytes, expected %d", what, n, want))
    end
    if off + 2 + n > limit then return nil end
    if n > 0 then tree:add(f_val, tvb(off + 2, n)) end
    return off + 2 + n
end

local function vec8_name(tree, tvb, off, limit, f_len, f_val, what)
    if off + 1 > limit then return nil end
    local n = tvb(off, 1):uint()
    local li = tree:add(f_len, tvb(off, 1))
    if n < 1 or n > MAX_NAME_SIZE then
        li:add_proto_expert_info(ef.malformed, string.format("%s is %d bytes, expected 1..%d", what, n, MAX_NAME_SIZE))
    end
    if off + 1 + n > limit then return nil end
    if n > 0 then tree:add(f_val, tvb(off + 1, n)) end
    return off + 1 + n
end

-- The layout of a ClientHello follows the highest version it offers that this file knows.
local function hello_layout(offered)
    local best = nil
    for _, v in ipairs(offered) do
        if KNOWN_VERSIONS[v] and (best == nil or v > best) then best = v end
    end
    return best
end

-- The hello dissectors return false when a field runs past the body (the caller flags it).
local function dissect_client_hello(tvb, tree, off, limit)
    if off + 1 > limit then return false end
    local nv = tvb(off, 1):uint()
    local p = off + 1
    local offered = {}
    for _ = 1, nv do
        if p + 2 > limit then return false end
        tree:add(f.offered_version, tvb(p, 2))
        offered[#offered + 1] = tvb(p, 2):uint()
        p = p + 2
    end
    if p + 1 > limit then return false end
    local ns = tvb(p, 1):uint(); p = p + 1
    for _ = 1, ns do
        if p + 2 > limit then return false end
        tree:add(f.offered_suite, tvb(p, 2)); p = p + 2
    end
    local layout = hello_layout(offered)
    if layout == nil then
        tree:add_proto_expert_info(ef.unknown_version, "no offered version is known: the rest of the hello is not decoded")
        if p < limit then tree:add(f.body, tvb(p, limit - p)) end
        return
    end
    tree:add(f.layout, layout):set_generated()
    if layout == VERSION_1 then
        tree:add_proto_expert_info(ef.old_version)
    end
    if p + RANDOM_SIZE > limit then return false end
    tree:add(f.random, tvb(p, RANDOM_SIZE)); p = p + RANDOM_SIZE
    if layout == VERSION_2 then
        if p + TIME_MS_SIZE > limit then return false end
        local ms = tvb(p, TIME_MS_SIZE):uint64()
        tree:add(f.time_ms, tvb(p, TIME_MS_SIZE))
        tree:add(f.time, tvb(p, TIME_MS_SIZE), NSTime.new((ms / 1000):tonumber(), (ms % 1000):tonumber() * 1000000))
        p = p + TIME_MS_SIZE
        p = vec8_name(tree, tvb, p, limit, f.client_len, f.client, "client name")
        if p == nil then return false end
        p = vec8_name(tree, tvb, p, limit, f.server_len, f.server, "server name")
        if p == nil then return false end
    end
    p = vec16(tree, tvb, p, limit, f.x25519_len, f.x25519, X25519_SIZE, "X25519 key")
    if p == nil then return false end
    p = vec16(tree, tvb, p, limit, f.kem_len, f.kem_ek, MLKEM768_PUBLIC_KEY_SIZE, "ML-KEM-768 encapsulation key")
    if p == nil then return false end
    if layout == VERSION_2 then
        p = vec16(tree, tvb, p, limit, f.sig_len, f.signature, MLDSA65_SIGNATURE_SIZE, "ML-DSA-65 signature")
        if p == nil then return false end
    end
    if p ~= limit then
        tree:add_proto_expert_info(ef.malformed, string.format("%d trailing bytes (a peer refuses this hello)", limit - p))
    end
end

local function dissect_server_hello(tvb, tree, off, limit)
    if off + 4 > limit then return false end
    tree:add(f.version, tvb(off, 2))
    tree:add(f.suite, tvb(off + 2, 2))
    local version = tvb(off, 2):uint()
    if not KNOWN_VERSIONS[version] then
        tree:add_proto_expert_info(ef.unknown_version, string.format("version 0x%04x: the rest of the hello is not decoded", version))
        if off + 4 < limit then tree:add(f.body, tvb(off + 4, limit - off - 4)) end
        return
    end
    if version == VERSION_1 then tree:add_proto_expert_info(ef.old_version) end
    -- The ServerHello's layout is the same in versions 1 and 2.
    if off + 4 + RANDOM_SIZE > limit then return false end
    tree:add(f.random, tvb(off + 4, RANDOM_SIZE))
    local p = vec16(tree, tvb, off + 4 + RANDOM_SIZE, limit, f.x25519_len, f.x25519, X25519_SIZE, "X25519 key")
    if p == nil then return false end
    p = vec16(tree, tvb, p, limit, f.kem_len, f.kem_ct, MLKEM768_CIPHERTEXT_SIZE, "ML-KEM-768 ciphertext")
    if p ~= nil and p ~= limit then
        tree:add_proto_expert_info(ef.malformed, string.format("%d trailing bytes (a peer refuses this hello)", limit - p))
    end
end

-- The server's refusal of a ClientHello, in clear, in place of its ServerHello.
local function dissect_alert(tvb, tree, off, limit)
    if limit - off ~= MAX_ALERT_BODY then
        tree:add_proto_expert_info(ef.malformed, string.format("alert body of %d bytes, expected %d", limit - off, MAX_ALERT_BODY))
        if limit > off then tree:add(f.body, tvb(off, limit - off)) end
        return "Alert (malformed)"
    end
    tree:add(f.alert_reason, tvb(off, 1))
    local r = tvb(off, 1):uint()
    return string.format("Alert (%s)", alert_short[r] or string.format("unknown reason %d", r))
end

-- What a record most likely is, from its side, its place and its size; updates the stream.
local function infer_record(s, side, body_len)
    local n = s.records[side]
    s.records[side] = n + 1
    local info = { epoch = s.epoch[side], seq = s.seq[side], rekey = nil }
    s.seq[side] = s.seq[side] + 1
    if n == 0 then
        -- The first record of each side is under the handshake keys; the application keys
        -- of epoch 0 start again at sequence 0.
        info.epoch = nil
        s.seq[side] = 0
    end
    if n == 0 and side == "client" then
        info.short = "ClientAuth"
        info.kind = string.format("ClientAuth (name of %d bytes, ML-DSA-65 signature)", body_len - AUTH_RECORD_OVERHEAD)
    elseif n == 0 and side == "server" then
        if body_len == CLOSE_RECORD then
            info.short = "Close"
            info.kind = "Close (the server refused this client)"
        else
            info.short = "ServerAuth"
            info.kind = string.format("ServerAuth (name of %d bytes, ML-DSA-65 signature)", body_len - AUTH_RECORD_OVERHEAD)
        end
    elseif side == "server" and s.rekey == nil and body_len == KEY_UPDATE_REQUEST_RECORD then
        -- An empty application message is as long; the server asks once per epoch.
        s.rekey = "asked"
        info.short = "KeyUpdateRequest"
        info.kind = "KeyUpdateRequest (the server's rekey limit is reached), or an empty application message"
    elseif side == "client" and (s.rekey == nil or s.rekey == "asked") and body_len == KEY_UPDATE_RECORD then
        s.rekey = "requested"
        info.short = "KeyUpdate"
        info.kind = "KeyUpdate (fresh X25519 + ML-KEM-768 encapsulation key)"
    elseif side == "server" and s.rekey == "requested" and body_len == KEY_UPDATE_RESPONSE_RECORD then
        s.rekey = "answered"
        info.short = "KeyUpdateResponse"
        info.kind = "KeyUpdateResponse (X25519 + ML-KEM-768 ciphertext), last server record of its epoch"
        s.epoch.server = s.epoch.server + 1
        s.seq.server = 0
        info.rekey = s.epoch.server
    elseif side == "client" and s.rekey == "answered" and body_len == KEY_UPDATE_DONE_RECORD then
        s.rekey = nil
        info.short = "KeyUpdateDone"
        info.kind = "KeyUpdateDone, last client record of its epoch"
        s.epoch.client = s.epoch.client + 1
        s.seq.client = 0
        info.rekey = s.epoch.client
    elseif body_len == CLOSE_RECORD then
        info.short = "Close?"
        info.kind = "Close, or application data of 1 byte"
    else
        info.short = "Data"
        info.kind = "application data"
    end
    return info
end

local function dissect_frame(tvb, pinfo, tree, off, ftype, blen, side, key)
    local size = FRAME_HEADER_SIZE + blen
    local name = frame_types[ftype] or string.format("Unknown frame type 0x%02x", ftype)
    local t = tree:add(proto, tvb(off, size), string.format("pacegate channel %s, %d bytes", name, size))
    t:add(f.direction, side == "client" and "client -> server" or "server -> client"):set_generated()
    t:add(f.type, tvb(off, 1))
    t:add(f.length, tvb(off + 1, 4))
    t:add(f.frame_size, size):set_generated()
    local body, limit = off + FRAME_HEADER_SIZE, off + size
    if ftype == FRAME_CLIENT_HELLO or ftype == FRAME_SERVER_HELLO then
        local dissect = ftype == FRAME_CLIENT_HELLO and dissect_client_hello or dissect_server_hello
        if dissect(tvb, t, body, limit) == false then
            t:add_proto_expert_info(ef.malformed, "truncated: a field runs past the body (a peer refuses this hello)")
        end
    elseif ftype == FRAME_ALERT then
        name = dissect_alert(tvb, t, body, limit)
    elseif ftype == FRAME_RECORD then
        local info = per_frame[key]
        if info == nil then
            local id = tcp_stream()
            info = infer_record(state_of(id and id.value or -1), side, blen)
            per_frame[key] = info
        end
        t:add(f.record_kind, info.kind):set_generated()
        t:add(f.record_content, info.short):set_generated()
        if info.epoch ~= nil then
            t:add(f.epoch, info.epoch):set_generated()
            t:add(f.keys, string.format("application, epoch %d", info.epoch)):set_generated()
        else
            t:add(f.keys, "handshake"):set_generated()
        end
        t:add(f.record_seq, UInt64(info.seq)):set_generated()
        if blen > TAG_SIZE then t:add(f.ciphertext, tvb(body, blen - TAG_SIZE)) end
        if blen >= TAG_SIZE then t:add(f.tag, tvb(limit - TAG_SIZE, TAG_SIZE)) end
        if info.rekey ~= nil then
            t:add(f.rekey, info.rekey):set_generated()
            t:add_proto_expert_info(ef.rekey, string.format("%s side now on epoch %d", side, info.rekey))
        end
        name = info.short
    else
        t:add_proto_expert_info(ef.unknown_type, string.format("type 0x%02x", ftype))
        if blen > 0 then t:add(f.body, tvb(body, blen)) end
    end
    return name
end

function proto.dissector(tvb, pinfo, tree)
    local len = tvb:len()
    -- The server listens on the configured port: towards it is the client's side.
    local side = registered_ports[pinfo.dst_port] and "client" or "server"
    local offset, names = 0, {}
    while offset < len do
        local remaining = len - offset
        if remaining < FRAME_HEADER_SIZE then
            pinfo.desegment_offset = offset
            pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
            break
        end
        local ftype = tvb(offset, 1):uint()
        local blen = tvb(offset + 1, 4):uint()
        local max = MAX_FRAME_BODY
        if ftype == FRAME_CLIENT_HELLO or ftype == FRAME_SERVER_HELLO then
            max = MAX_HELLO_BODY
        elseif ftype == FRAME_ALERT then
            max = MAX_ALERT_BODY
        end
        if blen > max then
            local t = tree:add(proto, tvb(offset), "pacegate channel: frame too large")
            t:add(f.type, tvb(offset, 1))
            t:add(f.length, tvb(offset + 1, 4))
            t:add_proto_expert_info(ef.too_large, string.format("%d bytes, limit %d", blen, max))
            names[#names + 1] = "oversized frame"
            offset = len
            break
        end
        if remaining < FRAME_HEADER_SIZE + blen then
            pinfo.desegment_offset = offset
            pinfo.desegment_len = FRAME_HEADER_SIZE + blen - remaining
            break
        end
        names[#names + 1] = dissect_frame(tvb, pinfo, tree, offset, ftype, blen, side,
            tostring(pinfo.number) .. ":" .. tostring(offset))
        offset = offset + FRAME_HEADER_SIZE + blen
    end
    if #names > 0 then
        pinfo.cols.protocol = "pacegate-channel"
        pinfo.cols.info = string.format("%s: %s", side == "client" and "C->S" or "S->C", table.concat(names, ", "))
    end
    return len
end

local function register_ports()
    if registered ~= nil then tcp_table:remove_all(proto) end
    registered = tostring(proto.prefs.ports)
    registered_ports = {}
    for lo_s, hi_s in registered:gmatch("(%d+)%-?(%d*)") do
        local lo = tonumber(lo_s)
        local hi = tonumber(hi_s) or lo
        for port = lo, hi do
            registered_ports[port] = true
            tcp_table:add(port, proto)
        end
    end
end

function proto.prefs_changed()
    if registered ~= tostring(proto.prefs.ports) then register_ports() end
end

register_ports()
