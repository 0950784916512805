-- pacegate_sealed.lua: Wireshark dissector for pacegate's sealed reading (docs/wire-formats.md).
--
-- A post-dissector: for every MQTT PUBLISH whose topic matches the preference
-- "pacegate.sealed.topic" (default pacemakers/+/telemetry), it dissects the message as a
-- sealed reading: version, (v2) boot epoch, counter, ciphertext, tag, and the device id taken
-- from the topic level named by "pacegate.sealed.device_level" (the device id is not in the
-- payload; the AEAD's associated data binds it). It reads the PUBLISH through the MQTT
-- dissector's own fields, so it works wherever MQTT is dissected: over TLS with a key log, or
-- in clear. v1 is 40 bytes (version, counter, 31); v2 is 48 (version, 8-byte boot epoch,
-- counter, 31): the v2 key is derived per boot epoch, so what must never repeat is the
-- (device, epoch, counter) triple, not the counter alone.

-- Wireshark 4.0's MQTT dissector has no dissector table keyed by topic (only the
-- "mqtt_message_decoding" UAT, which lives in the user's profile), hence a post-dissector.
--
-- The constants below are docs/wire-formats.md's table; tests/test_wireshark.py checks them
-- against pacegate.sealed. A version this file does not know is shown as such, not guessed.
-- Install: pacegate wireshark install (or tshark -X lua_script:pacegate_sealed.lua ...).

-- Installed as a plugin *and* given with -X lua_script: the first copy loaded wins (a
-- protocol cannot be registered twice; each script has its own globals, so ask Wireshark).
local already_loaded, existing = pcall(Dissector.get, "pacegate.sealed")
if already_loaded and existing ~= nil then return end

local VERSION_1 = 1
local VERSION_2 = 2
local KNOWN_VERSIONS = { [VERSION_1] = true, [VERSION_2] = true }
local HEADER_SIZE = 9 -- v1: version (1) + counter (8)
local EPOCH_SIZE = 8 -- v2: random per device boot, selects the derived key
local HEADER_SIZE_V2 = HEADER_SIZE + EPOCH_SIZE -- 17: version (1) + epoch (8) + counter (8)
local READING_SIZE = 15 -- the reading inside the AEAD
local TAG_SIZE = 16 -- Poly1305
local SEALED_SIZE_V1 = HEADER_SIZE + READING_SIZE + TAG_SIZE -- 40
local SEALED_SIZE_V2 = HEADER_SIZE_V2 + READING_SIZE + TAG_SIZE -- 48
local MAX_SEALED_SIZE = 256 -- the gateway refuses anything longer before parsing
local DEFAULT_TOPIC = "pacemakers/+/telemetry"
local DEFAULT_DEVICE_LEVEL = 1

local proto = Proto("pacegate.sealed", "pacegate sealed reading")

local f = {
    device = ProtoField.string("pacegate.sealed.device", "Device id (from the topic)"),
    topic = ProtoField.string("pacegate.sealed.topic", "Topic"),
    length = ProtoField.uint32("pacegate.sealed.length", "Payload length", base.DEC),
    version = ProtoField.uint8("pacegate.sealed.version", "Version", base.DEC),
    known = ProtoField.bool("pacegate.sealed.version_known", "Version known to this dissector"),
    epoch = ProtoField.bytes("pacegate.sealed.epoch", "Boot epoch (v2: selects the per-boot key)"),
    counter = ProtoField.uint64("pacegate.sealed.counter", "Counter (nonce, replay sequence)", base.DEC),
    ciphertext = ProtoField.bytes("pacegate.sealed.ciphertext", "Ciphertext (ChaCha20 of the 15-byte reading)"),
    tag = ProtoField.bytes("pacegate.sealed.tag", "Tag (Poly1305)"),
    body = ProtoField.bytes("pacegate.sealed.body", "Body (version not known to this dissector)"),
}
proto.fields = f

local ef = {
    unknown_version = ProtoExpert.new("pacegate.sealed.unknown_version", "Sealed-reading version not known to this dissector",
        expert.group.UNDECODED, expert.severity.NOTE),
    malformed = ProtoExpert.new("pacegate.sealed.malformed", "Not a valid sealed reading (the gateway refuses it)",
        expert.group.MALFORMED, expert.severity.WARN),
}
proto.experts = ef

proto.prefs.topic = Pref.string("Topic filter", DEFAULT_TOPIC,
    "MQTT topic filter of the sealed readings ('+' one level, '#' the rest)")
proto.prefs.device_level = Pref.uint("Device id level", DEFAULT_DEVICE_LEVEL,
    "Which topic level (from 0) holds the device id")

local mqtt_topic = Field.new("mqtt.topic")
local mqtt_msg = Field.new("mqtt.msg") -- referenced so that tshark keeps them
local mqtt_msgtype = Field.new("mqtt.msgtype")
local MQTT_PUBLISH = 3

local function split_topic(s)
    local out = {}
    for level in (s .. "/"):gmatch("([^/]*)/") do
        out[#out + 1] = level
    end
    return out
end

-- MQTT 3.1.1 section 4.7 matching, as gateway/config.py's Route.device_id_from does it.
local function device_of(topic)
    local want = split_topic(proto.prefs.topic)
    local got = split_topic(topic)
    local fixed = #want
    if want[#want] == "#" then
        fixed = #want - 1
        if #got < fixed then return nil end
    elseif #got ~= #want then
        return nil
    end
    for i = 1, fixed do
        if want[i] ~= "+" and want[i] ~= got[i] then return nil end
    end
    if got[1]:sub(1, 1) == "$" and (want[1] == "+" or want[1] == "#") then return nil end
    return got[proto.prefs.device_level + 1]
end

local function dissect_one(topic_fi, msg_fi, device, tree)
    local range = msg_fi.range
    local n = range:len()
    local t = tree:add(proto, range, string.format("pacegate sealed reading, %s", device))
    t:add(f.device, topic_fi.range, device)
    t:add(f.topic, topic_fi.range, topic_fi.value)
    t:add(f.length, range, n):set_generated()
    if n < 1 or n > MAX_SEALED_SIZE then
        t:add_proto_expert_info(ef.malformed, string.format("%d bytes (1..%d allowed)", n, MAX_SEALED_SIZE))
        return "malformed"
    end
    local version = range(0, 1):uint()
    t:add(f.version, range(0, 1))
    if not KNOWN_VERSIONS[version] then
        t:add(f.known, range(0, 1), false):set_generated()
        t:add_proto_expert_info(ef.unknown_version, string.format("version %d", version))
        if n > 1 then t:add(f.body, range(1)) end
        t:append_text(string.format(", unknown version %d", version))
        return string.format("v%d (unknown)", version)
    end
    t:add(f.known, range(0, 1), true):set_generated()
    -- Each known version's layout: where the counter starts, and the whole size.
    local counter_at, size = HEADER_SIZE - 8, SEALED_SIZE_V1
    if version == VERSION_2 then counter_at, size = HEADER_SIZE_V2 - 8, SEALED_SIZE_V2 end
    if n ~= size then
        t:add_proto_expert_info(ef.malformed, string.format("v%d is %d bytes, this is %d", version, size, n))
        t:append_text(string.format(", v%d malformed", version))
        return string.format("v%d malformed", version)
    end
    local epoch_text = ""
    if version == VERSION_2 then
        t:add(f.epoch, range(1, EPOCH_SIZE))
        epoch_text = " epoch " .. range(1, EPOCH_SIZE):bytes():tohex():lower()
    end
    local body_at = counter_at + 8
    local counter = range(counter_at, 8):uint64()
    t:add(f.counter, range(counter_at, 8))
    t:add(f.ciphertext, range(body_at, READING_SIZE))
    t:add(f.tag, range(body_at + READING_SIZE, TAG_SIZE))
    if counter == UInt64(0) then
        t:add_proto_expert_info(ef.malformed, "counter 0 is never used")
    end
    t:append_text(string.format(", v%d%s, counter %s", version, epoch_text, tostring(counter)))
    return string.format("v%d%s #%s", version, epoch_text, tostring(counter))
end

function proto.dissector(tvb, pinfo, tree)
    if mqtt_topic() == nil then return end -- the cheap test first: no MQTT topic here
    -- Pair each PUBLISH message with its own topic: walk the packet's fields in tree order
    -- (one frame may carry several PUBLISH, and a SUBSCRIBE has topics but no message).
    local seen = {}
    local in_publish, topic_fi = false, nil
    for _, fi in ipairs({ all_field_infos() }) do
        local name = fi.name
        if name == "mqtt.msgtype" then
            in_publish, topic_fi = fi.value == MQTT_PUBLISH, nil
        elseif name == "mqtt.topic" and in_publish then
            topic_fi = fi
        elseif name == "mqtt.msg" and topic_fi ~= nil then
            local device = device_of(topic_fi.value)
            if device ~= nil then
                seen[#seen + 1] = device .. " " .. dissect_one(topic_fi, fi, device, tree)
            end
            topic_fi = nil
        end
    end
    if #seen > 0 then
        pinfo.cols.protocol:append("/pacegate")
        pinfo.cols.info:append(" [sealed " .. table.concat(seen, ", ") .. "]")
    end
end

register_postdissector(proto)
