/*
 * pacegate's certificate identity for Debian's mosquitto 2.0 (plugin API v5).
 *
 * Why a plugin: mosquitto 2.0.11 leaves the client certificate's purpose to OpenSSL
 * (src/net_mosq.c net__tls_load_verify / client_certificate_verify returns OpenSSL's
 * verdict), whose ssl_client purpose accepts a certificate with no extendedKeyUsage at all
 * (crypto/x509/v3_purp.c check_purpose_ssl_client: xku_reject only rejects an EKU that
 * lacks the usage). No mosquitto option asks for more. And with use_identity_as_username,
 * mosquitto runs no authentication plugin for a certificate client (src/handle_connect.c
 * handle__connect: "Authentication assumed to be cleared"), so a plugin that only checked
 * the EKU there would never be asked.
 *
 * So this plugin *is* the certificate identity, and the generated configuration no longer
 * sets use_identity_as_username / use_username_as_clientid. For every CONNECT, before
 * mosquitto looks up, takes over or resumes a session (connect__on_authorised runs only
 * after mosquitto_unpwd_check succeeds), it:
 *   1. refuses a certificate whose extendedKeyUsage is absent or lacks clientAuth;
 *   2. refuses a certificate without exactly one subject CN (or one with a NUL in it);
 *   3. refuses a client id that is not that CN (as the embedded broker does);
 *   4. sets the username to the CN (the ACL's %u, and the name dynamic-security's
 *      disableClient kicks by).
 * and answers MOSQ_ERR_SUCCESS or MOSQ_ERR_AUTH, never MOSQ_ERR_PLUGIN_DEFER: in 2.0.11
 * the first basic-auth callback that does not defer decides, and if every plugin defers
 * the client is refused (src/security.c mosquitto_unpwd_check). It must be the first
 * `plugin` line, before the dynamic-security plugin, whose basic-auth callback would
 * otherwise see the client's own unchecked username and password first.
 *
 * On SIGHUP mosquitto runs this check again for every connected client
 * (src/security_default.c mosquitto_security_apply_default), with the same result.
 */
#include <stdio.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/crypto.h>
#include <openssl/objects.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

/* A device id or service name is far shorter; a longer CN is refused, not truncated. */
#define MAX_IDENTITY 64
/* How much of a peer-chosen client id goes into the log (printable ASCII only). */
#define MAX_LOGGED_ID 64

static mosquitto_plugin_id_t *plugin_id = NULL;

/* A peer's string as a bounded, printable copy for the log. */
static void printable(const char *in, char *out, size_t out_size)
{
	size_t i = 0;
	if(in){
		for(; in[i] && i + 1 < out_size; i++){
			unsigned char c = (unsigned char)in[i];
			out[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
		}
	}
	out[i] = '\0';
}

static int refuse_at(int level, struct mosquitto *client, const char *reason, const char *detail)
{
	char id[MAX_LOGGED_ID + 1];
	const char *address = mosquitto_client_address(client);

	printable(mosquitto_client_id(client), id, sizeof(id));
	mosquitto_log_printf(level,
			"pacegate: refused client '%s' from %s: %s (%s)",
			id, address ? address : "?", reason, detail);
	return MOSQ_ERR_AUTH;
}

static int refuse(struct mosquitto *client, const char *reason, const char *detail)
{
	return refuse_at(MOSQ_LOG_NOTICE, client, reason, detail);
}

/* The certificate's one subject CN, as UTF-8, into cn (1: ok, 0: none, several, bad). */
static int single_common_name(X509 *cert, char *cn, size_t cn_size)
{
	X509_NAME *name = X509_get_subject_name(cert);
	X509_NAME_ENTRY *entry;
	unsigned char *utf8 = NULL;
	int index, length, ok = 0;

	if(!name) return 0;
	index = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
	if(index < 0) return 0;
	if(X509_NAME_get_index_by_NID(name, NID_commonName, index) >= 0) return 0;
	entry = X509_NAME_get_entry(name, index);
	if(!entry) return 0;
	length = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(entry));
	if(length > 0 && (size_t)length < cn_size && strlen((char *)utf8) == (size_t)length){
		memcpy(cn, utf8, (size_t)length + 1);
		ok = 1;
	}
	OPENSSL_free(utf8);
	return ok;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	X509 *cert;
	uint32_t flags;
	char cn[MAX_IDENTITY + 1];
	const char *client_id;
	int has_cn;

	(void)event;
	(void)userdata;

	cert = mosquitto_client_certificate(ed->client);
	if(!cert){
		/* require_certificate refuses such a client at the handshake, so this is an offline
		 * session re-checked on SIGHUP (mosquitto ignores the verdict for those): debug only */
		return refuse_at(MOSQ_LOG_DEBUG, ed->client, "no_client_certificate",
				"no TLS client certificate");
	}
	/* X509_get_extension_flags computes the extension cache first (X509_check_purpose(-1)) */
	flags = X509_get_extension_flags(cert);
	if(!(flags & EXFLAG_XKUSAGE)){
		X509_free(cert);
		return refuse(ed->client, "client_certificate_without_client_auth",
				"the certificate has no extendedKeyUsage; pacegate requires clientAuth");
	}
	if(!(X509_get_extended_key_usage(cert) & XKU_SSL_CLIENT)){
		X509_free(cert);
		return refuse(ed->client, "client_certificate_without_client_auth",
				"the certificate's extendedKeyUsage lacks clientAuth");
	}
	has_cn = single_common_name(cert, cn, sizeof(cn));
	X509_free(cert);
	if(!has_cn){
		return refuse(ed->client, "certificate_without_identity",
				"the certificate needs exactly one subject CN");
	}
	client_id = mosquitto_client_id(ed->client);
	if(!client_id || strcmp(client_id, cn) != 0){
		return refuse(ed->client, "client_id_mismatch",
				"the client id must be the certificate's CN");
	}
	if(mosquitto_set_username(ed->client, cn) != MOSQ_ERR_SUCCESS){
		return refuse(ed->client, "internal_error", "could not set the username");
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	int rc;

	(void)userdata;
	(void)options;
	(void)option_count;
	plugin_id = identifier;
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	if(rc == MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_INFO,
				"pacegate: certificate identity plugin loaded (clientAuth required, client id = CN)");
	}
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	if(plugin_id){
		mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	}
	return MOSQ_ERR_SUCCESS;
}
